"""HKD from a diffusers UNet2DModel teacher (hkd.diffusers_unet) and HKDPipeline (hkd.pipeline): the split is the
teacher's forward, one step with A = 0 is the teacher's denoised estimate at T, the model folder rebuilds without
the teacher, bad folders are one line, and the pipeline round-trips through diffusers' folder layout."""

import json

import pytest
import torch
from helpers import diffusers_folders

from hkd import cli
from hkd.model import HKDModel, TeacherSplitError
from hkd.teacher import load_teacher

diffusers = pytest.importorskip("diffusers")

CASES = [(layout, p) for layout in diffusers_folders.LAYOUTS for p in ("epsilon", "v_prediction", "sample")]


def _relative(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One teacher folder per (layout, prediction type), 3 channels at 8x8."""
    root = tmp_path_factory.mktemp("diffusers")
    return {
        (layout, p): diffusers_folders.write_folder(root / f"{layout}-{p}", layout, p, channels=3, size=8)
        for layout, p in CASES
    }


def test_hub_is_offline():
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE


@pytest.mark.parametrize(("layout", "prediction_type"), CASES)
def test_split_is_the_teacher_and_one_step_is_its_denoised_estimate(folders, layout, prediction_type):
    teacher = load_teacher(folders[layout, prediction_type])
    model = HKDModel.from_teacher(teacher).eval()
    assert model.keeps_skip == (prediction_type != "sample")
    noise = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        # decode(encode(x, t), t) is the UNet2DModel's forward, at several timesteps per batch
        x, sigma = torch.randn(4, 3, 8, 8), torch.tensor([0.01, 0.5, 7.0, 80.0])
        label = model.net.preconditioning(sigma)[3]
        ours = model.net.decode(model.net.encode(x, label), label)
        torch.testing.assert_close(ours, teacher.unet(x, label).sample, rtol=1e-5, atol=1e-6)
        # A = 0: one step from x_T is D_teacher(x_T; T), the skip term included; so is the trajectory at T
        expected = teacher(noise * model.T, model.T)
        assert _relative(model.generate(noise), expected) < 1e-4
        assert _relative(model(noise * model.T, model.T), expected) < 1e-4
        assert _relative(model.trajectory(noise, [model.T])[0], expected) < 1e-4
        if model.keeps_skip:  # a planted fault: without the skip term the epsilon and v outputs are far off
            z = model.encode(noise * model.T, model.T)
            c_skip, c_out, _, t_T = model.coefficients(model.T)
            bare = c_out * model.net.decode(z, t_T.expand(4))
            assert _relative(bare, expected) > 1e-3
            with pytest.raises(ValueError, match="skip term"):
                model.decode(z)


@pytest.mark.parametrize(
    "changes",
    [
        {"mid_block_type": None},  # the up path starts from the last down output, which is also a skip
        {"out_channels": 6},  # a learned variance: the first C channels are the prediction
        {"center_input_sample": True},
        {"resnet_time_scale_shift": "scale_shift"},
    ],
    ids=["no-mid-block", "learned-variance", "centred-input", "scale-shift"],
)
def test_split_of_other_unet2dmodel_settings(tmp_path, changes):
    teacher = load_teacher(diffusers_folders.write_folder(tmp_path / "t", channels=3, size=8, **changes))
    model = HKDModel.from_teacher(teacher).eval()
    noise = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _relative(model.generate(noise), teacher(noise * model.T, model.T)) < 1e-4


def test_model_folder_rebuilds_without_the_teacher(folders, tmp_path):
    import shutil

    source = tmp_path / "teacher"
    shutil.copytree(folders["resnet", "v_prediction"], source)
    model = HKDModel.from_teacher(load_teacher(source)).eval()
    with torch.no_grad():
        for p in model.propagator.parameters():  # a trained-looking generator
            p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "model")
    shutil.rmtree(source)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model"]["diffusers"]["prediction_type"] == "v_prediction"
    assert not list((tmp_path / "model").glob("*.pkl")) and not list((tmp_path / "model").glob("*.bin"))
    loaded = HKDModel.from_pretrained(tmp_path / "model").eval()
    noise = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.generate(noise), model.generate(noise))


def test_T_is_at_most_the_schedules_largest_sigma(tmp_path):
    from hkd.config import section, to_dict
    from hkd.errors import ConfigError
    from hkd.model import ModelConfig

    folder = diffusers_folders.write_folder(tmp_path / "sd-schedule", size=8)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler |= {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # largest sigma 14.6
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    teacher = load_teacher(folder)
    model = HKDModel.from_teacher(teacher)
    assert model.T == pytest.approx(14.6146, abs=1e-4)
    with torch.no_grad():
        noise = torch.randn(2, 1, 8, 8)
        assert _relative(model.generate(noise), teacher(noise * model.T, model.T)) < 1e-4
    settings = {"model": {**to_dict(model.config), "sigma_max": 80.0}}
    with pytest.raises(ConfigError, match="at most 14.61"):
        HKDModel.from_teacher(teacher, section(settings, "model", ModelConfig))


def test_unsupported_blocks_and_bad_folders_are_one_line(tmp_path, capsys, one_thread):
    # a block the split does not know (the teacher still loads: its trajectories need only its forward)
    skip = diffusers_folders.write_folder(
        tmp_path / "skip", down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), block_out_channels=(32, 32),
    )  # fmt: skip
    with pytest.raises(TeacherSplitError, match="unsupported block SkipDownBlock2D in down_block_types") as error:
        HKDModel.from_teacher(load_teacher(skip))
    assert "\n" not in str(error.value)

    # a UNet2DConditionModel, a missing scheduler config, an unknown block name: hkd trajectories exits 2, one line
    conditional = tmp_path / "sd" / "unet"
    diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
    ).save_pretrained(conditional)  # fmt: skip
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "sd" / "scheduler")
    no_scheduler = diffusers_folders.write_folder(tmp_path / "no-scheduler")
    for path in (no_scheduler / "scheduler").iterdir():
        path.unlink()
    (no_scheduler / "scheduler").rmdir()
    unknown = diffusers_folders.write_folder(tmp_path / "unknown")
    config = json.loads((unknown / "unet" / "config.json").read_text())
    config["down_block_types"][0] = "FancyDownBlock2D"
    (unknown / "unet" / "config.json").write_text(json.dumps(config))
    for folder, words in [
        (tmp_path / "sd", "UNet2DConditionModel, not a UNet2DModel"),
        (no_scheduler, "no scheduler config"),
        (unknown, "FancyDownBlock2D"),
    ]:
        argv = ["trajectories", "--teacher", folder, "--out", tmp_path / "store", "--device", "cpu", "--quiet"]
        assert cli.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
        assert not list((tmp_path / "store").glob("*"))  # nothing written (hkd makes --out before loading the teacher)
    # the split's refusal through the CLI: hkd train exits 2 with the line naming the block, before any work
    argv = ["train", f"train.teacher={skip}", f"train.out={tmp_path / 'run'}", f"train.store={tmp_path / 'none'}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "SkipDownBlock2D" in err and len(err.strip().splitlines()) == 1, err


# --- HKDPipeline ---------------------------------------------------------------------------------------------------


def test_pipeline_round_trip_matches_generate(folders, tmp_path):
    from hkd.pipeline import HKDPipeline

    model = HKDModel.from_teacher(load_teacher(folders["ddpm", "epsilon"])).eval()
    with torch.no_grad():
        for p in model.propagator.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "model")
    assert (
        cli.main(
            ["export", "--format", "diffusers", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "pipe")]
        )
        == 0
    )
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "HKDPipeline" and index["network"] == ["hkd.pipeline", "HKDNetwork"]
    assert (tmp_path / "pipe" / "network" / "diffusion_pytorch_model.safetensors").is_file()
    assert (
        cli.main(
            ["export", "--format", "diffusers", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "pipe")]
        )
        == 2
    )

    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe")  # finds the class hkd.pipeline registered
    assert isinstance(pipe, HKDPipeline)
    again = HKDPipeline.from_pretrained(tmp_path / "pipe")
    again.save_pretrained(tmp_path / "pipe2")
    again = HKDPipeline.from_pretrained(tmp_path / "pipe2")

    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = (model.generate(noise) / 2 + 0.5).clamp(0, 1)
    for p in (pipe, again):
        out = p(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="pt")
        assert isinstance(out, diffusers.ImagePipelineOutput)
        assert torch.equal(out.images, expected)
    array = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), output_type="np").images
    assert array.shape == (3, 8, 8, 3) and torch.equal(torch.from_numpy(array).permute(0, 3, 1, 2), expected)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(7), output_type="pil").images
    assert len(images) == 2 and images[0].size == (8, 8)

    # one network evaluation per call: the encoder and the decoder run once each
    calls = []
    hooks = [
        m.register_forward_hook(lambda *a: calls.append(1))
        for m in (pipe.model.net.unet.conv_in, pipe.model.net.unet.conv_out)
    ]
    pipe(batch_size=2, output_type="pt")
    for h in hooks:
        h.remove()
    assert len(calls) == 2

    times = [model.T, 1.0, model.eps]
    states = pipe.trajectory(times, batch_size=3, generator=torch.Generator().manual_seed(7), output_type="pt")
    with torch.no_grad():
        decoded = (model.trajectory(noise, times) / 2 + 0.5).clamp(0, 1)
    assert len(states) == 3 and all(torch.equal(a, b) for a, b in zip(states, decoded, strict=True))
    assert torch.equal(states[-1], expected)
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="latent")
    with pytest.raises(ValueError, match="times"):
        pipe.trajectory([2 * model.T])


# --- the real commands, end to end ---------------------------------------------------------------------------------

TRAJECTORIES = [
    "trajectories.num_trajectories=16",
    "trajectories.num_steps=3",
    "trajectories.shard_size=8",
    "trajectories.batch_size=8",
    "trajectories.dtype=float32",
]
TRAIN = ["train.batch=8", "train.epochs=1", "train.max_steps=2", "train.time_samples=2", "train.sample_every=0"]
TRAIN += ["train.checkpoint_every=2", "train.log_every=1", "train.workers=0", "train.lambda4=0.5"]


def hkd(*argv) -> None:
    code = cli.main([str(a) for a in argv])
    assert code == 0, f"hkd {' '.join(map(str, argv))} exited {code}"


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "prediction_type"), [("ddpm", "epsilon"), ("resnet", "v_prediction")])
def test_commands_from_a_diffusers_folder(tmp_path, monkeypatch, one_thread, layout, prediction_type):
    """UNet2DModel folder (save_pretrained) -> hkd trajectories -> hkd train (HKD initialised from it) -> eval ->
    analyze -> edit -> export (pt2 and diffusers), on the embedded digits (1 channel, 16x16)."""
    monkeypatch.chdir(tmp_path)
    teacher = diffusers_folders.write_folder(tmp_path / "teacher", layout, prediction_type)
    hkd("trajectories", "--teacher", teacher, "--out", "store", "--device", "cpu", "--quiet", *TRAJECTORIES)
    hkd("train", "train.store=store", f"train.teacher={teacher}", "train.out=run", *TRAJECTORIES, *TRAIN)
    model = HKDModel.from_pretrained(tmp_path / "run" / "model")
    assert model.config.diffusers["prediction_type"] == prediction_type
    assert model.config.diffusers["unet"]["down_block_types"] == list(
        diffusers_folders.LAYOUTS[layout]["down_block_types"]
    )
    # training started from the teacher: its U-Net weights moved, but only a little in two steps
    start = HKDModel.from_teacher(load_teacher(teacher))
    moved = [_relative(a, b) for a, b in zip(model.net.parameters(), start.net.parameters(), strict=True)]
    assert 0 < max(moved) < 0.5

    hkd(
        "eval",
        "--model",
        "run/model",
        "--teacher",
        teacher,
        "--num",
        4,
        "--few-steps",
        2,
        "--out",
        "eval",
        "--device",
        "cpu",
    )
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [row["evaluations"] for row in rows] == [35, 2, 1]
    hkd("analyze", "--model", "run/model", "--num", 2, "--times", 3, "--out", "analysis", "--device", "cpu")
    assert (tmp_path / "analysis" / "analysis.json").is_file()
    hkd(
        "edit",
        "--model",
        "run/model",
        "--num",
        2,
        "--ratios",
        "0,0.5",
        "--steps",
        2,
        "--out",
        "edit",
        "--device",
        "cpu",
    )
    assert (tmp_path / "edit" / "edit.json").is_file()
    hkd("export", "--format", "pt2", "--model", "run/model", "--out", "model.pt2", "--batch", 2)
    hkd("export", "--format", "diffusers", "--model", "run/model", "--out", "pipe")

    noise = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = model.eval().generate(noise)
        exported = torch.export.load(tmp_path / "model.pt2").module()(noise)
    assert _relative(exported, expected) < 1e-5
    from hkd.pipeline import HKDPipeline

    pipe = HKDPipeline.from_pretrained(tmp_path / "pipe")
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = (model.generate(noise) / 2 + 0.5).clamp(0, 1)
    assert torch.equal(pipe(batch_size=2, generator=generator, output_type="pt").images, expected)
