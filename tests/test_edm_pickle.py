"""EDM snapshot pickles: nothing in them runs, DDPM++ rebuilds to EDM's outputs, imports round-trip.

The pickles are written by tests/helpers/edm_format.py in EDM's persistence format; the fidelity oracle is its float64
forward of EDM's layout (EDM's names, qkv interleaving, [sin, cos] embedding, resampling by filtered convolution),
which shares no code with hkd.unet or hkd.edm_pickle.
"""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import edm_format

from hkd import cli, edm_pickle
from hkd.edm_pickle import UnsafePickleError
from hkd.teacher import load_teacher

SIGMAS = (0.002, 0.05, 1.0, 10.0, 80.0)


def _snapshot(tmp_path, name="net.pkl", **kwargs):
    ema = edm_format.songunet(**kwargs)
    path = tmp_path / name
    edm_format.write_snapshot(path, ema)
    return ema, path


def _relative(ours, ref):
    return ((ours.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(precond="EDMPrecond", augment_dim=9),  # stem 16 != 2 x 16: the first conv's width is EDM's
        dict(precond="EDMPrecond", img_resolution=16, channel_mult=(1, 2, 2), attn_resolutions=(16, 4), num_blocks=2),
        dict(precond="VPPrecond"),
        dict(precond="VEPrecond"),
    ],
    ids=["edm", "edm-3-levels", "vp", "ve"],
)
def test_rebuilt_ddpmpp_reproduces_edm_to_1e5(tmp_path, kwargs):
    ema, path = _snapshot(tmp_path, **kwargs)
    teacher = load_teacher(path)
    x = torch.randn(3, 3, 16, 16)
    for sigma in SIGMAS:
        x_t = x[:2] + sigma * x[1:]  # an image-like part plus noise of that level
        error = _relative(teacher(x_t, sigma), edm_format.reference_denoiser(ema, x_t, sigma))
        assert error < 1e-5, f"sigma {sigma}: relative error {error:.2e}"
    # per-sample sigmas, as the samplers pass them
    sigma = torch.tensor([0.002, 80.0])
    x_t = x[:2] * sigma.reshape(-1, 1, 1, 1)
    assert _relative(teacher(x_t, sigma), edm_format.reference_denoiser(ema, x_t, sigma)) < 1e-5


def test_conditional_pickle_takes_labels(tmp_path):
    ema, path = _snapshot(tmp_path, label_dim=10)
    teacher = load_teacher(path)
    assert teacher.label_dim == 10
    x, sigma = torch.randn(4, 3, 16, 16), torch.tensor([0.02, 0.5, 3.0, 80.0])
    labels = F.one_hot(torch.tensor([0, 3, 3, 9]), 10).float()
    ours = teacher(x, sigma, labels)
    assert _relative(ours, edm_format.reference_denoiser(ema, x, sigma, labels)) < 1e-5
    other = teacher(x, sigma, F.one_hot(torch.tensor([1, 3, 3, 9]), 10).float())
    assert not torch.allclose(ours[0], other[0]) and torch.equal(ours[1:], other[1:])
    # no labels: all-zero labels, as EDM does
    assert _relative(teacher(x, sigma), edm_format.reference_denoiser(ema, x, sigma)) < 1e-5


def test_planted_source_is_never_executed(tmp_path):
    marker = tmp_path / "executed.txt"
    planted = f"open({str(marker)!r}, 'w').write('the pickle ran code')\n"
    probe = tmp_path / "probe.txt"  # the plant works: executing it (as EDM's loader would) writes the file
    exec(planted.replace(str(marker), str(probe)), {})  # noqa: S102 - the test's own string, not the pickle
    assert probe.read_text() == "the pickle ran code"

    ema = edm_format.songunet()
    path = tmp_path / "planted.pkl"
    edm_format.write_snapshot(path, ema, module_src=planted)
    assert planted.encode() in path.read_bytes()
    teacher = load_teacher(path)
    edm_pickle.import_teacher(path, tmp_path / "imported")
    load_teacher(tmp_path / "imported")
    assert not marker.exists()
    x = torch.randn(2, 3, 16, 16)
    assert _relative(teacher(x, 1.0), edm_format.reference_denoiser(ema, x, 1.0)) < 1e-5


class _Evil:
    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("call", [os.system, eval, exec, subprocess.call, getattr], ids=lambda f: f.__name__)
def test_other_globals_are_refused_before_running(tmp_path, call):
    marker = tmp_path / "executed.txt"
    command = f"open({str(marker)!r}, 'w').write('x')"
    args = {os.system: (f"touch {marker}",), subprocess.call: ([sys.executable, "-c", command],)}.get(call, (command,))
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Evil(call, *args)}))
    with pytest.raises(UnsafePickleError, match=rf"refuses \S*{call.__name__}"):
        load_teacher(path)
    assert not marker.exists()
    assert cli.main(["import-teacher", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_class_from_the_file_is_refused(tmp_path):
    # a network pickled as a plain class reference (not a persistence record) would import EDM's code
    data = b"\x80\x02ctraining.networks\nSongUNet\n)\x81."  # PROTO 2, GLOBAL, EMPTY_TUPLE, NEWOBJ, STOP
    path = tmp_path / "class.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match="training.networks.SongUNet"):
        edm_pickle.read_snapshot(path)


def test_import_teacher_round_trip(tmp_path, capsys):
    _, path = _snapshot(tmp_path, label_dim=4)
    out = tmp_path / "teacher"
    assert cli.main(["import-teacher", str(path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["format"] == edm_pickle.FORMAT
    from_pickle, imported = load_teacher(path), load_teacher(out)
    assert imported.identity["source"] == "edm-import" and from_pickle.identity["source"] == "edm-pickle"
    assert imported.identity["hash"] == from_pickle.identity["hash"]  # trajectories of one serve the other
    x, labels = torch.randn(2, 3, 16, 16), F.one_hot(torch.tensor([1, 2]), 4).float()
    assert torch.equal(imported(x, 3.0, labels), from_pickle(x, 3.0, labels))


def test_architectures_hkd_does_not_rebuild_are_named(tmp_path):
    ema = edm_format.songunet()
    ema.modules["model"].modules["map_noise"].class_name = "FourierEmbedding"
    edm_format.write_snapshot(tmp_path / "ncsn.pkl", ema)
    with pytest.raises(ValueError, match="NCSN"):
        load_teacher(tmp_path / "ncsn.pkl")
    ema = edm_format.songunet()
    ema.modules["model"].class_name = "DhariwalUNet"
    edm_format.write_snapshot(tmp_path / "adm.pkl", ema)
    with pytest.raises(ValueError, match="ADM"):
        load_teacher(tmp_path / "adm.pkl")
    ema = edm_format.songunet(precond="iDDPMPrecond")
    edm_format.write_snapshot(tmp_path / "iddpm.pkl", ema)
    with pytest.raises(ValueError, match="iDDPMPrecond"):
        load_teacher(tmp_path / "iddpm.pkl")


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    (tmp_path / "garbage.pkl").write_bytes(b"garbage\n")  # pickle's GET opcode with a bad memo key: a ValueError
    for path in (tmp_path / "junk.pkl", tmp_path / "garbage.pkl", tmp_path / "missing.pkl"):
        assert cli.main(["import-teacher", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and not (tmp_path / "out").exists()
    _, good = _snapshot(tmp_path)
    (tmp_path / "a_file").write_text("the user's")
    assert cli.main(["import-teacher", str(good), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and (tmp_path / "a_file").read_text() == "the user's"
    truncated = tmp_path / "truncated.pkl"
    edm_format.write_snapshot(truncated, edm_format.songunet())
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt"):
        load_teacher(truncated)


# --- HKD from an EDM teacher ---------------------------------------------------------------------------------------


def test_from_teacher_starts_from_the_edm_network(tmp_path):
    from hkd.model import HKDModel

    _, path = _snapshot(tmp_path, augment_dim=9)  # stem width 16, not channel_mult[0] x 16
    teacher = load_teacher(path)
    model = HKDModel.from_teacher(teacher).eval()
    assert model.config.stem_channels == 16 and model.config.sigma_data == 0.5
    noise, T = torch.randn(3, 3, 16, 16), 80.0
    x_T = T * noise
    c_skip = 0.25 / (T**2 + 0.25)
    with torch.no_grad():
        one_step = model.generate(noise)
        # A = 0: the teacher's D(x_T; T), less the documented c_skip(T) x_T term
        torch.testing.assert_close(one_step + c_skip * x_T, teacher(x_T, T), rtol=1e-5, atol=1e-5)
        assert _relative(one_step, teacher(x_T, T) - c_skip * x_T) < 1e-5
        c_in = 1 / (T**2 + 0.25) ** 0.5
        label = torch.full((3,), torch.tensor(T).log().item() / 4)
        for ours, theirs in zip(model.encode(x_T, T), teacher.net.encode(c_in * x_T, label), strict=True):
            torch.testing.assert_close(ours, theirs)


def test_from_teacher_refuses_what_it_cannot_split(tmp_path, tiny_diffusers_unet):
    from hkd.model import HKDModel, TeacherSplitError
    from hkd.teacher import VPPrecond, vp_alphas_cumprod

    for name, kwargs, match in [
        ("vp.pkl", dict(precond="VPPrecond"), "VP preconditioning"),
        ("cond.pkl", dict(label_dim=3), "unconditional"),
    ]:
        _, path = _snapshot(tmp_path, name, **kwargs)
        with pytest.raises(TeacherSplitError, match=match) as error:
            HKDModel.from_teacher(load_teacher(path))
        assert "\n" not in str(error.value)
    unet = tiny_diffusers_unet()
    unet.register_to_config(mid_block_type="UNetMidBlock2DCrossAttn")  # a block the split does not know
    teacher = VPPrecond(unet, vp_alphas_cumprod({}))
    teacher.identity = {"source": "diffusers"}
    with pytest.raises(TeacherSplitError, match="diffusers UNet2DModel.*UNetMidBlock2DCrossAttn") as error:
        HKDModel.from_teacher(teacher)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
