import pytest
import torch

from hkd.unet import UNet


def tiny(**kwargs):
    args = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    net = UNet(**(args | kwargs))
    with torch.no_grad():  # undo the zero initialisation so that every path carries signal
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_latent_shapes_and_forward_is_decode_of_encode():
    net = tiny(channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(4,)).eval()
    x, labels = torch.randn(3, 3, 8, 8), torch.randn(3)
    latents = net.encode(x, labels)
    # level 0: input conv + 2 blocks of 16; level 1: down (16) + 2 blocks of 32; level 2: down (32) + 2 x 32
    assert net.latent_chunks == [[16, 16, 16], [16, 32, 32], [32, 32, 32]]
    assert [tuple(z.shape) for z in latents] == [(3, 48, 8, 8), (3, 80, 4, 4), (3, 96, 2, 2)]
    assert net.latent_shapes == [tuple(z.shape[1:]) for z in latents]
    out = net(x, labels)
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(out, net.decode(latents, labels))


def test_every_level_and_the_noise_label_reach_the_output():
    net = tiny().eval()
    x, labels = torch.randn(2, 3, 8, 8), torch.randn(2)
    latents = net.encode(x, labels)
    base = net.decode(latents, labels)
    for level in range(len(latents)):
        changed = [z + (0.5 if i == level else 0.0) * torch.randn_like(z) for i, z in enumerate(latents)]
        assert (net.decode(changed, labels) - base).abs().max() > 1e-4, f"level {level} does not reach the output"
    assert (net(x, labels + 1.0) - base).abs().max() > 1e-4


def test_batch_independence_and_gradients():
    net = tiny(dropout=0.1).eval()
    x, labels = torch.randn(4, 3, 8, 8, requires_grad=True), torch.randn(4)
    out = net(x, labels)
    torch.testing.assert_close(out[1:2], net(x[1:2], labels[1:2]), rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


def test_without_noise_embedding():
    net = tiny(embed_noise=False).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(net(x, None), net(x, torch.randn(2)))
    assert not any("map_" in name for name, _ in net.named_parameters())


def test_fresh_network_outputs_zero():
    net = UNet(8, 1, 2, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    assert net(torch.randn(2, 1, 8, 8), torch.randn(2)).abs().max() == 0  # zero-initialised output conv


def test_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        UNet(12, 3, 3, channel_mult=(1, 2, 2, 2))
    net = tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        net(torch.randn(2, 1, 8, 8), torch.randn(2))
    with pytest.raises(ValueError, match="latents of shapes"):
        net.decode(net.encode(torch.randn(2, 3, 8, 8), torch.randn(2))[:1], torch.randn(2))
