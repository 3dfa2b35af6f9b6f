import json
import math

import pytest
import torch

from hkd.model import HKDModel, ModelConfig
from hkd.unet import UNet

TINY = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1)


def perturb(module, scale=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def tiny_model(**kwargs):
    model = HKDModel(ModelConfig(**(TINY | kwargs)))
    perturb(model.net)
    # eigenvalues of size ~ 2 / |tau(T, eps)| (a dense d x d matrix of N(0, s^2) has eigenvalues of size s sqrt(d))
    scale = 2 / abs(float(model.tau(model.T, model.eps)))
    with torch.no_grad():
        for p in model.propagator.parameters():
            if p.requires_grad:
                p.normal_(0, scale / (math.sqrt(p.shape[-1]) if model.config.generator == "dense" else 1))
    return model.eval()


def test_zero_generators_are_encode_then_decode():
    model = HKDModel(ModelConfig(**TINY)).eval()
    perturb(model.net)
    x, t = torch.randn(2, 3, 8, 8) * 5, torch.tensor([5.0, 0.3])
    torch.testing.assert_close(model(x, t), model.decode(model.encode(x, t)))
    noise = torch.randn(2, 3, 8, 8)  # standard normal: x_T = T noise
    with torch.no_grad():
        torch.testing.assert_close(model.generate(noise), model.decode(model.encode(80 * noise, 80.0)))


@pytest.mark.parametrize("generator,clock", [("spectral", "identity"), ("spectral", "log"), ("dense", "log")])
def test_trajectory_is_closed_form_and_a_semigroup(generator, clock):
    model = tiny_model(generator=generator, clock=clock)
    noise = torch.randn(2, 3, 8, 8)
    times = [80.0, 10.0, 0.5, 0.002]
    with torch.no_grad():
        frames = model.trajectory(noise, times)
        assert frames.shape == (4, 2, 3, 8, 8)
        z_T = model.encode(80 * noise, 80.0)
        z_mid = model.propagate(z_T, 80.0, 10.0)
        torch.testing.assert_close(frames[2], model.decode(model.propagate(z_mid, 10.0, 0.5)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(frames[0], model.decode(z_T))
        torch.testing.assert_close(frames[-1], model.generate(noise), rtol=1e-4, atol=1e-5)
        assert (frames[0] - frames[-1]).abs().max() > 1e-3  # the generators do evolve the latents
    torch.testing.assert_close(model(80 * noise, 80.0).detach(), frames[-1], rtol=1e-4, atol=1e-5)
    expected = math.log(0.002 / 80) if clock == "log" else 0.002 - 80
    assert float(model.tau(80.0, 0.002)) == pytest.approx(expected)


def test_per_sample_times_and_the_cached_one_step_propagator():
    model = tiny_model(generator="dense", per_position=False)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([80.0, 1.0, 0.01])
    together = model(x, t)
    for i in range(3):
        torch.testing.assert_close(together[i : i + 1], model(x[i : i + 1], t[i]), rtol=1e-4, atol=1e-5)
    noise = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        first = model.generate(noise)
        torch.testing.assert_close(first, model(80 * noise, 80.0))
        model.propagator.generators[0].mul_(-2)  # in place, as an optimiser step: the cache must notice
        torch.testing.assert_close(model.generate(noise), model(80 * noise, 80.0))
        assert (model.generate(noise) - first).abs().max() > 1e-4
        model.propagator.generators[1].data.mul_(0.5)  # through .data (no version bump)
        torch.testing.assert_close(model.generate(noise), model(80 * noise, 80.0))


def test_ablations_freeze_the_right_generators():
    plain = tiny_model(koopman=False)
    assert not any(p.requires_grad for p in plain.propagator.parameters())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 0.1])
    torch.testing.assert_close(plain(x, t), plain.decode(plain.encode(x, t)))

    flat = tiny_model(hierarchy=False)
    flags = [
        [a.requires_grad, b.requires_grad] for a, b in zip(flat.propagator.alphas, flat.propagator.betas, strict=True)
    ]
    assert flags == [[False, False], [True, True]]
    z = flat.encode(x, t)
    assert z[0].abs().max() == 0 and z[1].abs().max() > 0  # one Koopman latent: the other skips are removed
    full = HKDModel(ModelConfig(**TINY))
    full.net.load_state_dict(flat.net.state_dict())
    torch.testing.assert_close(z[1], full.encode(x, t)[1])  # the deepest level is the same encoder's
    evolved = flat.propagate(z, t, flat.eps)
    assert (evolved[1] - z[1]).abs().max() > 1e-4
    flat(x, t).square().mean().backward()
    assert flat.propagator.alphas[1].grad.abs().sum() > 0 and flat.propagator.alphas[0].grad is None


def test_estimated_scale_reads_the_noise_level_off_the_state():
    """encoder_scale=estimated: sigma_hat^2 = mean(x^2) - sigma_data^2 (floored at eps^2), and the encoder is told
    nothing else: E(x_t) is the same at every t, and it is the teacher-style encoding at sigma_hat."""
    model = tiny_model(encoder_sees_noise=False, encoder_scale="estimated").eval()
    torch.manual_seed(1)
    noise = torch.randn(4, 3, 8, 8)
    sigma = torch.tensor([0.01, 0.7, 5.0, 80.0])
    x = noise / noise.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()  # unit mean square
    x = x * (sigma**2 + model.sigma_data**2).sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(model.estimate_sigma(x), sigma)
    assert model.estimate_sigma(torch.zeros(2, 3, 8, 8)).tolist() == pytest.approx([model.eps] * 2)
    for a, b in zip(model.encode(x, 1.0), model.encode(x, torch.tensor([3.0, 0.1, 9.0, 80.0])), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    told = tiny_model(encoder_sees_noise=True)
    told.load_state_dict(model.state_dict())
    for a, b in zip(model.encode(x, 1.0), told.eval().encode(x, sigma), strict=True):
        torch.testing.assert_close(a, b)


def test_save_and_load_give_identical_outputs(tmp_path):
    model = tiny_model(generator="dense", clock="log", encoder_sees_noise=False)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = HKDModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([2.0, 40.0])
    torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)


def test_checkpoint_errors_name_the_problem(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json"):
        HKDModel.from_pretrained(tmp_path / "nothing")
    config = json.loads((tmp_path / "m/config.json").read_text())
    config["model"]["model_channels"] = 8
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match config.json"):
        HKDModel.from_pretrained(tmp_path / "m")
    config["model"]["colour"] = 1
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.colour"):
        HKDModel.from_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        HKDModel.from_pretrained(tmp_path / "m")


def test_wrong_images_fail_before_compute():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        model(torch.randn(2, 1, 8, 8), 1.0)
    with pytest.raises(ValueError, match="noise"):
        model.generate(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="one entry per sample"):
        model(torch.randn(2, 3, 8, 8), torch.ones(3))


def teacher_unet():
    args = {k: v for k, v in TINY.items() if k not in ("img_resolution", "img_channels")}
    return perturb(UNet(8, 3, 3, **args)).eval()


def test_from_teacher_unet_copies_encoder_and_decoder():
    net = teacher_unet()
    model = HKDModel.from_teacher(net).eval()
    x, t = 80 * torch.randn(2, 3, 8, 8), 80.0
    c_in = 1 / math.sqrt(80**2 + 0.25)
    label = torch.full((2,), math.log(80) / 4)
    for ours, theirs in zip(model.encode(x, t), net.encode(c_in * x, label), strict=True):
        torch.testing.assert_close(ours, theirs)
    # zero generators: the teacher's one-step denoiser at T, without its c_skip(T) x_T term
    c_out = 80 * 0.5 / math.sqrt(80**2 + 0.25)
    torch.testing.assert_close(model(x, t), c_out * net(c_in * x, label))
    with pytest.raises(ValueError, match="model_channels=32"):
        HKDModel.from_teacher(net, ModelConfig(**(TINY | {"model_channels": 32})))
    with pytest.raises(TypeError, match="UNet"):
        HKDModel.from_teacher(torch.nn.Linear(2, 2))


def test_from_teacher_edm_precond():
    from hkd.edm import EDMPrecond

    denoiser = EDMPrecond(teacher_unet(), sigma_data=0.5)
    model = HKDModel.from_teacher(denoiser).eval()
    noise = torch.randn(2, 3, 8, 8)
    x = 80 * noise
    c_skip = 0.25 / (80**2 + 0.25)
    torch.testing.assert_close(model.generate(noise) + c_skip * x, denoiser(x, 80.0), rtol=1e-4, atol=1e-5)


def test_hkd_generate_command(tmp_path, capsys):
    import numpy as np

    from hkd.cli import main

    model = tiny_model(img_channels=1)
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    args = ["generate", "--model", str(tmp_path / "m"), "--num", "3", "--out", str(out), "--device", "cpu"]
    assert main([*args, "--trajectory", "4", "--npz", "--seed", "7"]) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert (out / "grid.png").is_file() and (out / "trajectory_grid.png").is_file()
    assert len(list((out / "trajectories").iterdir())) == 3
    saved = np.load(out / "samples.npz")
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(saved["images"]), model.generate(noise))
    assert saved["trajectory"].shape == (3, 4, 1, 8, 8) and saved["times"][0] == 80.0
    torch.testing.assert_close(saved["trajectory"][:, -1], saved["images"], rtol=1e-4, atol=1e-5)
    assert main(["generate", "--model", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_training_step_reaches_every_part_and_autocast_runs():
    model = tiny_model().train()
    x, t = torch.randn(2, 3, 8, 8) * 3, torch.tensor([3.0, 0.5])
    model(x, t).square().mean().backward()
    assert model.propagator.alphas[0].grad.abs().sum() > 0 and model.propagator.betas[1].grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.net.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.eval()(x, t)
    assert low.dtype == torch.float32  # the decoder's output is in float32, like the teacher's
    with torch.no_grad():
        torch.testing.assert_close(low, model(x, t), rtol=0.1, atol=0.1)
