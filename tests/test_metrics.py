"""Metrics: Frechet distance against closed forms and scipy, the offline digits classifier, FID's missing weights."""

import numpy as np
import pytest
import scipy.linalg
import torch

from hkd import evaluation, metrics


def test_frechet_distance_matches_scipy_sqrtm_formula():
    a, b = (
        torch.randn(200, 6, dtype=torch.float64),
        torch.randn(150, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64),
    )
    b = b + torch.randn(6, dtype=torch.float64)
    mu1, s1 = a.mean(0).numpy(), np.cov(a.numpy(), rowvar=False)
    mu2, s2 = b.mean(0).numpy(), np.cov(b.numpy(), rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance_features(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
    mu1, mu2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    v1, v2 = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(5, dtype=torch.float64) + 0.1
    expected = (mu1 - mu2).square().sum() + (v1.sqrt() - v2.sqrt()).square().sum()
    got = metrics.frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert got == pytest.approx(float(expected), rel=1e-10)
    assert metrics.frechet_distance(mu1, torch.diag(v1), mu1, torch.diag(v1)) == pytest.approx(0, abs=1e-10)


def test_gaussian_stats_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.gaussian_stats(torch.randn(1, 4))


def test_digits_classifier_is_accurate_deterministic_and_cached(classifier_cache, tmp_path):
    model = metrics.digits_classifier()
    cached = list(metrics.classifier_cache().parent.glob("digits_classifier_*.pt"))
    assert len(cached) == 1
    images, labels = metrics.digits_dataset()
    holdout = torch.arange(len(images)) % 5 == 0
    accuracy = (model(images[holdout]).argmax(1) == labels[holdout]).float().mean()
    assert accuracy > 0.9
    retrained, _ = metrics.train_digits_classifier()  # same recipe, same weights
    for x, y in zip(model.state_dict().values(), retrained.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_digits_metrics_separate_real_from_noise_and_mode_collapse(classifier_cache):
    images, labels = metrics.digits_dataset()
    real = metrics.digits_metrics(images[1::2], images[::2])
    noise = metrics.digits_metrics(torch.rand(400, 1, 16, 16) * 2 - 1, images[::2])
    one_class = metrics.digits_metrics(images[1::2][labels[1::2] == 3], images[::2])
    assert real["fd_digits"] < noise["fd_digits"] / 10
    assert real["fd_digits"] < one_class["fd_digits"] / 10
    assert real["recognisable"] > 0.8 > 0.2 > noise["recognisable"]
    assert one_class["class_entropy"] < 0.5 < 2.2 < real["class_entropy"]


def test_teacher_fidelity_is_zero_for_identical_images(classifier_cache):
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    same = evaluation.teacher_fidelity(x, x)
    assert same["mse"] == 0 and same["feature_distance"] == 0 and same["pseudo_huber"] == pytest.approx(0, abs=1e-6)
    lpips = lambda a, b: (a - b).abs().flatten(1).mean(1)  # any per-sample distance stands in for LPIPS here
    assert evaluation.teacher_fidelity(x, x + 0.25, lpips)["lpips"] == pytest.approx(0.25, rel=1e-5)
    other = evaluation.teacher_fidelity(x, x + 0.1)
    assert other["mse"] == pytest.approx(0.01, rel=1e-4) and other["pseudo_huber"] > 0
    with pytest.raises(ValueError, match="shapes differ"):
        evaluation.teacher_fidelity(x, x[:3])


def test_fid_without_inception_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.delenv("HKD_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Inception-v3 weights.*HKD_INCEPTION_WEIGHTS"):
        metrics.inception_weights()
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        metrics.inception_weights(tmp_path / "missing.pth")
    weights = tmp_path / "hub" / "checkpoints" / metrics.INCEPTION_FILE
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert metrics.inception_weights() == weights


def tiny_teacher():
    from hkd.data import DataConfig
    from hkd.teacher import TeacherConfig, build_net

    teacher = build_net(DataConfig(), TeacherConfig(model_channels=8, channel_mult=(1, 2)))
    teacher.img_channels, teacher.img_resolution = 1, 16
    return teacher.eval().requires_grad_(False)


def tiny_config(tmp_path):
    model = dict(img_resolution=16, img_channels=1, model_channels=8, channel_mult=[1, 2])
    train = dict(batch=4, epochs=1, max_steps=1, progress=False, sample_every=0, sample_count=4, out=str(tmp_path))
    return {"model": model, "train": train}


def test_evaluate_writes_the_comparison_table(classifier_cache, tmp_path):
    from hkd.model import HKDModel, ModelConfig

    teacher = tiny_teacher()
    model = HKDModel(ModelConfig(**tiny_config(tmp_path)["model"])).eval()
    rows, written = evaluation.evaluate(model, teacher, baseline=model, num=8, out_dir=tmp_path)
    assert [r["evaluations"] for r in rows] == [35, 3, 1, 1]
    assert rows[0]["mse"] == 0  # the teacher's 35-evaluation endpoint is the fidelity reference
    assert rows[2]["mse"] == rows[3]["mse"] > 0
    assert {"fd_digits", "recognisable", "pseudo_huber", "feature_distance"} <= set(rows[2])
    text = written[0].read_text()
    assert "HKD (one step)" in text and "| teacher (Euler, 3 steps) | 3 |" in text
    names = ["eval.md", "eval.json", "faithfulness.md", "faithfulness.json", "faithfulness.png", "trajectories.png"]
    assert [p.name for p in written] == names
