"""The paper's pipeline on a CIFAR-shaped model (32x32x3) at toy scale, through the real `hkd` command: an EDM
DDPM++ snapshot pickle -> import-teacher -> trajectories -> train with LPIPS -> fid-ref -> eval with FID against an
image folder -> generate -> analyze -> edit (inpainting and colourisation from the folder) -> ablate with FID.

The weights that LPIPS and FID read are random and local (tests/helpers/offline_weights.py), so every code path runs and
nothing downloads; the numbers mean nothing, so the test checks that each command exits 0 and writes its outputs
with the right shapes and finite numbers."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import edm_format
from helpers.offline_weights import random_alexnet_file, random_inception_file
from PIL import Image

from hkd import cli, metrics
from hkd.model import HKDModel

pytest.importorskip("lpips")
pytest.importorskip("torch_fidelity")

# a few dozen trajectories of a 3-step Heun solve (4 states each), stored in float32
TRAJECTORIES = [
    "trajectories.num_trajectories=24",
    "trajectories.num_steps=3",
    "trajectories.shard_size=12",
    "trajectories.batch_size=12",
    "trajectories.dtype=float32",
]


def numbers_in(value) -> list[float]:
    """Every number inside a JSON value (bools excluded); the caller checks they are finite."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers_in(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers_in(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def all_finite(path, part: str | None = None) -> bool:
    value = json.loads(path.read_text())
    numbers = numbers_in(value if part is None else value[part])
    return bool(numbers) and all(math.isfinite(x) for x in numbers)


def hkd(*argv) -> None:
    code = cli.main([str(a) for a in argv])
    assert code == 0, f"hkd {' '.join(map(str, argv))} exited {code}"


@pytest.mark.slow
def test_cifar_shaped_pipeline_from_an_edm_pickle(tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache: only the files given here
    monkeypatch.delenv("HKD_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))

    # -- the inputs: an EDM snapshot pickle, random Inception and AlexNet weight files, a folder of 32x32 images
    ema = edm_format.songunet(img_resolution=32, in_channels=3, model_channels=8, channel_mult=(1, 2),
                              attn_resolutions=(16,))  # fmt: skip
    edm_format.write_snapshot(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl", ema)
    inception = random_inception_file(tmp_path / metrics.INCEPTION_FILE)
    alexnet = tmp_path / "alexnet-owt-7be5be79.pth"
    random_alexnet_file(alexnet)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        pixels = torch.randint(0, 256, (4, 4, 3), dtype=torch.uint8).repeat_interleave(8, 0).repeat_interleave(8, 1)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:02d}.png")

    # -- the teacher and its trajectories
    hkd("import-teacher", tmp_path / "edm-cifar10-32x32-uncond-vp.pkl", "--out", "teacher")
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
    hkd("trajectories", "--config", "cifar10", "--teacher", "teacher", "--out", "trajectories", *TRAJECTORIES)
    manifest = json.loads((tmp_path / "trajectories" / "manifest.json").read_text())
    assert manifest["num_trajectories"] == 24 and manifest["state_shape"] == [3, 32, 32]
    assert sum(t1 - t0 for t0, t1 in (s["trajectories"] for s in manifest["shards"].values())) == 24

    # -- HKD, Algorithm 1 with the LPIPS term (AlexNet backbone from the local file; without it: refused)
    train = ["--config", "cifar10", "train.store=trajectories", "train.teacher=teacher", *TRAJECTORIES]
    train += ["train.batch=8", "train.epochs=1", "train.max_steps=2", "train.precision=fp32", "train.workers=0"]
    train += ["train.time_samples=2", "train.sample_every=0", "train.checkpoint_every=2", "train.log_every=1"]
    train += ["train.perceptual=lpips", "train.lpips_net=alex", "train.lpips_resize=32"]
    assert cli.main(["train", *train, "train.out=refused", f"train.lpips_weights={tmp_path / 'missing.pth'}"]) == 2
    assert "LPIPS backbone weights" in capsys.readouterr().err
    hkd("train", *train, "train.out=hkd", f"train.lpips_weights={alexnet}")
    model = HKDModel.from_pretrained(tmp_path / "hkd" / "model")
    assert (model.img_channels, model.img_resolution) == (3, 32)
    log = (tmp_path / "hkd" / "log.csv").read_text().splitlines()
    losses = [float(line.split(",")[log[0].split(",").index("loss")]) for line in log[1:]]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

    # -- FID: reference statistics of the folder, then eval against the folder itself
    fid = ["--inception-weights", inception]
    hkd("fid-ref", folder, "--out", "reference.npz", *fid)
    mu, sigma = metrics.load_stats(tmp_path / "reference.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and torch.isfinite(sigma).all()
    hkd("eval", "--model", "hkd/model", "--teacher", "teacher", "--num", "4", "--few-steps", "2", "--out", "eval",
        "--reference", folder, *fid)  # fmt: skip
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [row["evaluations"] for row in rows] == [35, 2, 1]
    assert all("fid" in row and "fd_digits" not in row for row in rows) and all_finite(tmp_path / "eval" / "eval.json")
    assert "Sample quality: FID." in (tmp_path / "eval" / "eval.md").read_text()
    assert all_finite(tmp_path / "eval" / "faithfulness.json", "summary")  # its rows hold 0/0 at t = T

    # -- samples, spectral analysis, editing with known images from the folder
    hkd("generate", "--model", "hkd/model", "--num", "3", "--npz", "--out", "samples")
    with np.load(tmp_path / "samples" / "samples.npz", allow_pickle=False) as saved:
        assert saved["arr_0"].shape == (3, 32, 32, 3) and saved["arr_0"].dtype == np.uint8
    assert Image.open(tmp_path / "samples" / "samples" / "000000.png").size == (32, 32)
    hkd("analyze", "--model", "hkd/model", "--num", "2", "--times", "3", "--out", "analysis")
    assert all_finite(tmp_path / "analysis" / "analysis.json")
    assert (tmp_path / "analysis" / "eigenvalues.png").is_file()
    hkd("edit", "--model", "hkd/model", "--known", folder, "--num", "2", "--steps", "2", "--ratios", "0,0.5",
        "--out", "edit")  # fmt: skip
    for name in ("edit_high.png", "edit_all.png", "inpaint.png", "colourise.png"):
        assert Image.open(tmp_path / "edit" / name).size[0] > 32, name
    assert all_finite(tmp_path / "edit" / "edit.json")

    # -- the ablation: four runs at the same tiny budget, FID against the reference statistics
    hkd("ablate", *train, f"train.lpips_weights={alexnet}", "--teacher", "teacher", "--num", "3", "--out", "ablation",
        "--reference", "reference.npz", *fid)  # fmt: skip
    rows = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    assert len(rows) == 4 and all("fid" in row and "fd_digits" not in row for row in rows)
    assert all_finite(tmp_path / "ablation" / "ablation.json")
    assert "Sample quality: FID." in (tmp_path / "ablation" / "ablation.md").read_text()
    assert all((tmp_path / "ablation" / run / "model" / "model.safetensors").is_file() for run in
               ("direct_regression", "Koopman_no_trajectory_loss", "Koopman_and_trajectory_loss_no_hierarchy",
                "HKD_all_three"))  # fmt: skip
