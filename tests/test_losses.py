import math

import pytest
import torch
import torch.nn.functional as F
from helpers.offline_weights import random_alexnet_file

from hkd import losses
from hkd.errors import UserError


def test_lambda1_schedule_is_the_paper_decay():
    epochs = int(torch.randint(2, 500, ()))
    epoch = float(torch.randint(0, epochs + 1, ()))
    assert losses.lambda1_schedule(epoch, epochs) == pytest.approx(10 ** (-3 * epoch / epochs))
    assert losses.lambda1_schedule(0, epochs) == 1.0
    assert losses.lambda1_schedule(epochs, epochs) == pytest.approx(1e-3)


def test_pseudo_huber_against_float64_formula():
    x, y = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    c = 0.00054 * math.sqrt(3 * 8 * 8)
    expected = [math.sqrt(((a.double() - b.double()) ** 2).sum().item() + c * c) - c for a, b in zip(x, y, strict=True)]
    torch.testing.assert_close(losses.pseudo_huber(x, y).double(), torch.tensor(expected, dtype=torch.float64))
    # small differences: quadratic ||d||^2 / (2c) (relative error ||d||^2 / (4 c^2) ~ 1e-4 here, the float32
    # cancellation ~ 1e-3); identical images: exactly 0
    d = 1e-5 * torch.randn(1, 3, 8, 8)
    assert losses.pseudo_huber(d, torch.zeros_like(d)).item() == pytest.approx(d.square().sum().item() / (2 * c), 1e-2)
    assert losses.pseudo_huber(x, x).abs().max().item() < 1e-6


@pytest.mark.parametrize("perceptual", ["none", "pseudo_huber"])
def test_distance_is_weighted_sum(perceptual):
    x, y = torch.randn(4, 1, 16, 16, requires_grad=True), torch.randn(4, 1, 16, 16)
    lambda1, lambda2 = float(torch.rand(())), float(torch.rand(()))
    got = losses.Distance(perceptual, lambda2=lambda2)(x, y, lambda1)
    expected = lambda1 * F.mse_loss(x, y, reduction="none").flatten(1).mean(1)
    if perceptual == "pseudo_huber":
        expected = expected + lambda2 * losses.pseudo_huber(x, y)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_perceptual_is_refused():
    with pytest.raises(ValueError, match="perceptual must be one of"):
        losses.Distance("lpipss")


def test_lpips_without_weights_is_a_clear_error_and_never_downloads(tmp_path, monkeypatch):
    pytest.importorskip("lpips")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(FileNotFoundError, match=r"alexnet-owt-7be5be79\.pth.*lpips_weights"):
        losses.Distance("lpips")
    with pytest.raises(FileNotFoundError, match="not found"):
        losses.Distance("lpips", lpips_weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_text("not a weights file")
    with pytest.raises(UserError, match="could not be read"):  # one line from every command
        losses.Distance("lpips", lpips_weights=str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("source", ["path", "hub_cache"])
def test_lpips_loads_the_backbone_from_a_local_file(tmp_path, monkeypatch, source):
    pytest.importorskip("lpips")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    # a stand-in for the ImageNet file (random weights: this test checks the loading, not the metric)
    path = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir(parents=True)
    state = random_alexnet_file(path)
    distance = losses.Distance("lpips", lpips_weights=str(path) if source == "path" else None, lpips_resize=64)
    net = distance.lpips.lpips.net.state_dict()
    torch.testing.assert_close(net["slice1.0.weight"], state["features.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(net["slice5.10.weight"], state["features.10.weight"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in distance.parameters())
    x = (torch.rand(3, 1, 16, 16) * 2 - 1).requires_grad_()
    y = torch.rand(3, 1, 16, 16) * 2 - 1
    assert distance(x.detach(), x.detach(), 0.0).abs().max().item() < 1e-6
    got = distance(x, y, 0.0)
    assert got.shape == (3,) and (got > 0).all()
    got.sum().backward()
    assert x.grad.abs().sum() > 0
