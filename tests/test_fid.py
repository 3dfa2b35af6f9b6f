"""FID, the standard protocol: EDM's uint8 quantisation, running Inception statistics, reference .npz files, and
agreement with torch-fidelity's own FID on the same images and the same (randomly initialised, local) weights."""

import json
import math

import numpy as np
import pytest
import torch
from helpers.offline_weights import random_inception_file

from hkd import cli, experiments, metrics

torch_fidelity = pytest.importorskip("torch_fidelity")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    return random_inception_file(tmp_path_factory.mktemp("inception") / metrics.INCEPTION_FILE)


def _images(n, shift=0.0):
    """Smooth random images in [-1, 1] on the uint8 grid (so the quantisation is exact)."""
    low = torch.nn.functional.interpolate(torch.randn(n, 3, 4, 4), size=32, mode="bilinear") * 0.5 + shift
    return ((low.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class _UInt8(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@pytest.mark.slow
def test_fid_agrees_with_torch_fidelity(inception_file, tmp_path):
    images, reference = _images(6), _images(6, shift=0.3)
    stats = metrics.inception_stats(reference, metrics.Inception(inception_file))
    assert stats[1].abs().max() > 1e-3  # the random network's features are not vanishing
    npz = metrics.save_stats(tmp_path / "ref.npz", *stats)
    ours = metrics.fid(images, metrics.load_stats(npz), weights=inception_file)
    theirs = torch_fidelity.calculate_metrics(
        input1=_UInt8(metrics.to_uint8(images)),
        input2=_UInt8(metrics.to_uint8(reference)),
        fid=True,
        feature_extractor_weights_path=str(inception_file),
        cuda=False,
        cache=False,
        verbose=False,
    )["frechet_inception_distance"]
    assert theirs > 0
    assert abs(ours - theirs) <= 1e-3 * theirs, (ours, theirs)


def test_quantisation_is_edms():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(metrics.to_uint8(pixels.float() / 127.5 - 1), pixels)  # a dataset image comes back exactly
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.001, 0.5, 1.0, 3.0])
    expected = [max(0, min(255, math.floor(127.5 * v + 128))) for v in x.tolist()]
    assert metrics.to_uint8(x).tolist() == expected


class _FakeInception(torch.nn.Module):
    """A cheap stand-in: a fixed random projection of the uint8 pixels."""

    def __init__(self, pixels, features=5):
        super().__init__()
        self.projection = torch.randn(pixels, features, dtype=torch.float64)
        self.seen = []

    def forward(self, images):
        assert images.dtype == torch.uint8
        self.seen.append(len(images))
        return images.flatten(1).double() @ self.projection


def test_inception_stats_in_batches_equal_gaussian_stats():
    images = _images(23)
    fake = _FakeInception(3 * 32 * 32)
    mu, sigma = metrics.inception_stats(images, fake, batch_size=5)
    assert fake.seen == [5, 5, 5, 5, 3]
    ref_mu, ref_sigma = metrics.gaussian_stats(fake(metrics.to_uint8(images)))
    torch.testing.assert_close(mu, ref_mu, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(sigma, ref_sigma, rtol=1e-9, atol=1e-6)
    from hkd.data import TensorImages

    dataset_mu, _ = metrics.inception_stats(TensorImages(images), fake, batch_size=7)
    torch.testing.assert_close(dataset_mu, mu, rtol=1e-12, atol=1e-9)


def test_reference_statistics_files(tmp_path):
    mu, sigma = torch.randn(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    path = metrics.save_stats(tmp_path / "ref.npz", mu, sigma)
    with np.load(path, allow_pickle=False) as data:  # EDM's fid.py layout
        assert sorted(data.files) == ["format", "mu", "sigma"] and data["sigma"].shape == (4, 4)  # + hkd's marker
    loaded = metrics.load_stats(path)
    assert torch.equal(loaded[0], mu) and torch.equal(loaded[1], sigma)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="do not fit"):
        metrics.load_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", arr_0=np.zeros(3))
    with pytest.raises(ValueError, match="mu and sigma"):
        metrics.load_stats(tmp_path / "other.npz")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "objects.npz").write_bytes((tmp_path / "objects.npy").read_bytes())
    with pytest.raises(ValueError):
        metrics.load_stats(tmp_path / "objects.npz")


def test_missing_inception_weights_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HKD_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=metrics.INCEPTION_FILE):
        metrics.Inception(tmp_path / "nowhere.pth")
    folder = tmp_path / "images"
    folder.mkdir()
    code = cli.main(["fid-ref", str(folder), "--out", str(tmp_path / "ref.npz"), "--inception-weights", "x.pth"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and metrics.INCEPTION_FILE in err


def test_generate_writes_native_pngs_and_an_arr0_npz(tmp_path):
    from PIL import Image

    from hkd.model import HKDModel, ModelConfig, generate_to

    model = HKDModel(ModelConfig(img_resolution=8, img_channels=3, model_channels=8, channel_mult=(1, 2))).eval()
    with torch.no_grad():
        for p in model.net.parameters():  # a network whose images are not constant
            p.normal_(0, 0.3)
    generate_to(model, tmp_path, 3, npz=True, seed=1)
    assert Image.open(tmp_path / "samples" / "000000.png").size == (8, 8)  # the grid alone is upscaled
    with np.load(tmp_path / "samples.npz", allow_pickle=False) as saved:
        arr = saved["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (3, 8, 8, 3)
        expected = metrics.to_uint8(torch.from_numpy(saved["images"])).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(arr, expected) and arr.std() > 0


@pytest.mark.slow
def test_rgb_commands_from_an_edm_pickle(tmp_path, monkeypatch, capsys):
    """import-teacher -> from_teacher -> fid-ref (image folder) -> eval with FID -> edit with known images, on a
    3-channel EDM teacher; the Inception network is a cheap stand-in here (test_fid_agrees_with_torch_fidelity runs
    the real one), so this checks the commands' plumbing."""
    from helpers import edm_format
    from PIL import Image

    from hkd.model import HKDModel
    from hkd.teacher import load_teacher

    edm_format.write_snapshot(tmp_path / "edm.pkl", edm_format.songunet(img_resolution=16, model_channels=8))
    assert cli.main(["import-teacher", str(tmp_path / "edm.pkl"), "--out", str(tmp_path / "teacher")]) == 0
    HKDModel.from_teacher(load_teacher(tmp_path / "teacher")).save_pretrained(tmp_path / "model")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(metrics.to_uint8(_images(5)).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i}.png")
    fake = _FakeInception(3 * 16 * 16)
    monkeypatch.setattr(metrics, "_inception", lambda path: fake)
    weights = tmp_path / metrics.INCEPTION_FILE
    weights.write_bytes(b"")
    ref = tmp_path / "ref.npz"
    common = ["--inception-weights", str(weights)]
    assert cli.main(["fid-ref", str(folder), "--resolution", "16", "--out", str(ref), *common]) == 0
    assert metrics.load_stats(ref)[0].shape == (5,)
    run = ["eval", "--model", str(tmp_path / "model"), "--teacher", str(tmp_path / "teacher"), "--num", "3"]
    run += ["--few-steps", "2", "--device", "cpu", *common]
    assert cli.main([*run, "--out", str(tmp_path / "a")]) == 2  # no reference: one line, before any sampling
    assert "--reference" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert cli.main([*run, "--reference", str(ref), "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert len(rows) == 3 and all(row["fid"] >= 0 for row in rows)
    folder_stats = metrics.reference_for(str(folder), 16, 3, weights)  # a folder works as --reference too
    assert torch.equal(folder_stats[0], metrics.load_stats(ref)[0])
    edit = ["edit", "--model", str(tmp_path / "model"), "--known", str(folder), "--num", "2", "--ratios", "0,0.5"]
    assert cli.main([*edit, "--steps", "2", "--out", str(tmp_path / "edit"), "--device", "cpu"]) == 0
    assert (tmp_path / "edit" / "colourise.png").is_file()


def test_ablation_of_rgb_images_needs_a_reference_before_training(tmp_path):
    teacher = torch.nn.Identity()
    teacher.img_channels, teacher.img_resolution = 3, 32
    with pytest.raises(ValueError, match="needs a reference"):
        experiments.ablate({"train": {"out": str(tmp_path)}}, teacher, out_dir=tmp_path, num=2)
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_bad_fid_inputs_are_one_line_before_any_work(tmp_path, capsys, inception_file):
    """A weights file that is not Inception's, an --out that is not an .npz, a --known or --reference that is
    neither a folder nor a config: exit 2 and one line, before sampling (no output folder made)."""
    from helpers import edm_format
    from PIL import Image

    from hkd.model import HKDModel
    from hkd.teacher import load_teacher

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(metrics.to_uint8(_images(1))[0].permute(1, 2, 0).numpy()).save(folder / "0.png")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a weights file")
    edm_format.write_snapshot(tmp_path / "edm.pkl", edm_format.songunet(img_resolution=16, model_channels=8))
    HKDModel.from_teacher(load_teacher(tmp_path / "edm.pkl")).save_pretrained(tmp_path / "model")
    evaluate = ["eval", "--model", str(tmp_path / "model"), "--teacher", str(tmp_path / "edm.pkl"), "--num", "2"]
    cases = [
        ([*evaluate, "--reference", str(folder), "--inception-weights", str(junk)], "not torch-fidelity's Inception"),
        ([*evaluate, "--reference", str(tmp_path / "nowhere"), "--inception-weights", str(inception_file)], "neither"),
        (["fid-ref", str(folder), "--out", str(folder / "0.png")], "written as an .npz file"),
        (["fid-ref", str(folder), "--out", str(tmp_path / "ref.npz"), "--inception-weights", str(junk)], "Inception"),
        (["edit", "--model", str(tmp_path / "model"), "--known", str(tmp_path / "nowhere")], "neither an image folder"),
    ]
    for argv, fragment in cases:
        assert cli.main([*argv, "--out", str(tmp_path / "out")] if argv[0] == "eval" else argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ref.npz").exists()
    assert Image.open(folder / "0.png").size == (32, 32)  # the user's image, untouched
