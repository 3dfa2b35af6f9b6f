"""Test helper: the weight files that FID and LPIPS read, with random weights, saved locally (nothing downloads).

They exercise the real loading and forward code paths; the numbers they give are not FID or LPIPS."""

from __future__ import annotations

from unittest import mock

import torch


def random_inception_file(path):
    """torch-fidelity's Inception-v3 with random weights, saved as its weights file. The batch-norm statistics are
    set from one batch (a data-dependent initialisation), so the pool3 features are of order one, not 1e-8."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with (
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None),
        mock.patch("torch.load", lambda *args, **kwargs: {}),
    ):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0  # running statistics := this batch's
    net.train()
    with torch.no_grad():
        net((torch.rand(4, 3, 32, 32) * 255).to(torch.uint8))
    torch.save(net.state_dict(), path)
    return path


def random_alexnet_file(path) -> dict:
    """torchvision's AlexNet `features` (the part LPIPS uses) with random weights, saved as its ImageNet file would
    be; returns the saved state dict."""
    import torchvision

    state = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features")}
    torch.save(state, path)
    return state
