"""The photos: patches of scikit-image's bundled colour photographs (hkd.data.photos), their config, their feature
space (hkd.feature_space), and `hkd demo --config photos --quick` end to end."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from hkd import config, files
from hkd.data import DataConfig, examples, load_dataset, photos


def test_photos_are_scikit_images_bundled_photographs():
    import skimage.data

    loaded = dict(zip(photos.SOURCES, photos.photos(), strict=True))
    for name in ("astronaut", "chelsea", "coffee", "immunohistochemistry"):
        expected = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(loaded[name], expected), name
    left, right = skimage.data.stereo_motorcycle()[:2]
    assert torch.equal(loaded["motorcycle_left"], torch.from_numpy(left).permute(2, 0, 1).float() / 127.5 - 1)
    assert torch.equal(loaded["motorcycle_right"], torch.from_numpy(right).permute(2, 0, 1).float() / 127.5 - 1)


def test_patches_are_deterministic_colour_and_in_range():
    images, labels = photos.load(16, 300, seed=5)
    assert images.shape == (300, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.long
    assert images.min() >= -1 and images.max() <= 1
    again, labels_again = photos.load(16, 300, seed=5)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(images, photos.load(16, 300, seed=6)[0])
    assert (images[:, 0] - images[:, 2]).abs().mean() > 0.05  # colour, not gray
    assert set(labels.tolist()) <= set(range(len(photos.SOURCES) * photos.ROW_BANDS))
    assert photos.load(32, 4)[0].shape == (4, 3, 32, 32)


def ramps(h: int = 120, w: int = 200) -> tuple[torch.Tensor, ...]:
    """Synthetic photos whose channel 0 is the column (0 .. 1), channel 1 the row, channel 2 the photo's index."""
    column = torch.linspace(0, 1, w).expand(h, w)
    row = torch.linspace(0, 1, h)[:, None].expand(h, w)
    return tuple(torch.stack([column, row, torch.full((h, w), i / 10)]) for i in range(len(photos.SOURCES)))


def test_held_out_patches_never_touch_a_training_column(monkeypatch):
    """Patches of photos whose pixels say where they are: every training patch lies in the left three quarters,
    every held-out patch in the right quarter, and each label names the photo and the third of its rows."""
    monkeypatch.setattr(photos, "photos", ramps)
    cut = round(200 * (1 - photos.HELD_OUT))  # the first held-out column; its value is cut / 199
    for split in photos.SPLITS:
        images, labels = photos.load(16, 2000, split=split, seed=0)
        columns = images[:, 0]  # resizing averages neighbouring columns, flips mirror them: the range stays
        if split == "train":
            assert columns.max() <= (cut - 1) / 199 + 1e-6
        else:
            assert columns.min() >= cut / 199 - 1e-6
        assert torch.equal(labels // photos.ROW_BANDS, (images[:, 2, 0, 0] * 10).round().long())
        centre_row = images[:, 1].mean((1, 2))
        band = labels % photos.ROW_BANDS
        assert (band == (centre_row * photos.ROW_BANDS).floor().clamp(max=2).long()).float().mean() > 0.97
    # a planted fault is caught: drawing the held-out patches from the training columns fails the test's bound
    monkeypatch.setattr(photos, "HELD_OUT", 0.0)
    assert photos.load(16, 200, split="train")[0][:, 0].max() > (cut - 1) / 199


def test_without_scikit_image_the_photos_demo_stops_in_one_line(monkeypatch, tmp_path, capsys):
    from hkd.cli import main

    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage then fails, as when it is not installed
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    assert main(["demo", "--config", "photos", "--quick", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'hkd[photos]'" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "demo").exists()  # refused before any work


def test_photos_config_and_dataset():
    cfg = config.load("photos")
    assert cfg.raw["data"] == {"name": "photos", "resolution": 16, "channels": 3, "patches": 20000}
    data = load_dataset(DataConfig(name="photos", resolution=16, channels=3, patches=64))
    assert len(data) == 64 and data[0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="channels must be 3"):
        DataConfig(name="photos", channels=1)
    with pytest.raises(ValueError, match="resolution must be 16 or 32"):
        DataConfig(name="photos", resolution=24, channels=3)
    known = examples(DataConfig(name="photos", resolution=16, channels=3), 5)
    assert torch.equal(known, photos.load(16, 5, split="test", seed=1)[0])


def test_photos_feature_space_tells_real_patches_from_corrupted_ones(monkeypatch, tmp_path):
    """A reduced recipe (fewer patches and epochs): the Frechet distance in its space ranks real training patches
    below blurred ones below gray ones below noise, and the cache is reused, or replaced when foreign."""
    from hkd import feature_space

    monkeypatch.setenv("HKD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(feature_space, "PHOTO_PATCHES", 3000)
    monkeypatch.setattr(feature_space, "PHOTO_EPOCHS", 3)
    monkeypatch.setattr(feature_space, "_PHOTOS", {})
    space = feature_space.space_for((3, 16, 16))
    assert space.metric == "fd_photos"
    accuracy = feature_space.photos_accuracy(16, num=500)
    assert accuracy["train"] > 0.2 and accuracy["test"] > 0.08  # chance: 1/27
    real = photos.load(16, 400, seed=9)[0]
    blurred = torch.nn.functional.avg_pool2d(real, 3, 1, 1, count_include_pad=False)
    gray = real.mean(1, keepdim=True).expand_as(real)
    distances = [space.distance(x) for x in (real, blurred, gray, torch.randn(400, 3, 16, 16))]
    assert distances == sorted(distances) and distances[0] < 0.2 * distances[2], distances
    assert len(list(tmp_path.glob("photos_classifier_16_*.pt"))) == 1
    monkeypatch.setattr(feature_space, "_PHOTOS", {})
    monkeypatch.setattr(feature_space, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
    assert feature_space.space_for((3, 16, 16)).distance(real) == pytest.approx(distances[0])
    # a foreign cache file (here: not a checkpoint at all) is replaced by a retrained classifier, never unpickled
    (cache,) = tmp_path.glob("photos_classifier_16_*.pt")
    cache.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(feature_space, "_PHOTOS", {})
    monkeypatch.setattr(feature_space, "train_classifier", lambda build, *a, **k: build().eval().requires_grad_(False))
    feature_space.photos_classifier(16)
    assert set(files.load(cache)["model"]) == set(feature_space.photos_classifier(16).state_dict())
    assert feature_space.space_for((3, 32, 32)) is None  # CIFAR-10's shape: FID, unless asked for


@pytest.mark.slow
def test_quick_photos_demo_runs_every_stage(tmp_path):
    """The photos pipeline at toy scale (--quality at the quick preset's sizes, overrides last): every stage, the
    ablation, the band spectra under both readings, the colour edits, and the report's links."""
    from hkd.demo import QUICK

    out = tmp_path / "demo"
    env = {**__import__("os").environ, "HKD_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "hkd.cli", "demo", "--config", "photos", "--quality", "--out", str(out),
           "train.threads=1", *QUICK]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=2400, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert report.startswith("# HKD demo on natural colour images")
    for heading in ("## Samples", "## Evaluation", "## Learning curve", "## Spectral analysis", "## Editing",
                    "## Ablation", "Koopman + trajectory loss, no hierarchy", "fd_photos", "held-out"):  # fmt: skip
        assert heading in report, heading
    for path in ("teacher/teacher.pt", "hkd/model", "baseline/model", "eval/feature_space.md", "edit/colourise.png",
                 "edit/inpaint.png", "analysis/power_spectrum_alpha.png", "analysis/power_spectrum_rate.png",
                 "ablation/ablation.md"):  # fmt: skip
        assert (out / path).exists(), path
    curves = json.loads((out / "curve" / "curve.json").read_text())
    assert all(math.isfinite(r["fd_photos"]) for rows in curves.values() for r in rows)
    rows = {r["name"]: r for r in json.loads((out / "eval" / "eval.json").read_text())}
    assert rows["HKD (one step)"]["fd_photos"] > 0 and rows["teacher (Heun, 18 steps)"]["feature_distance"] == 0
    edit = json.loads((out / "edit" / "edit.json").read_text())
    assert edit["known"] == 32 and edit["colourise_rmse"] > 0 and edit["inpaint_rmse"] > 0
    readings = json.loads((out / "analysis" / "analysis.json").read_text())["readings"]
    assert sorted(readings) == ["alpha", "rate"] and len(readings["rate"]["high"]["spectrum"]) == 9
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / link).is_file(), link
