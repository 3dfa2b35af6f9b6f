import math

import pytest
import torch

from hkd import faithfulness
from hkd.model import HKDModel, ModelConfig

MODEL = dict(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def trajectories(count: int = 6, steps: int = 5):
    """Point-mass PF-ODE trajectories x_t = x_0 + t n on an EDM-like grid (times from 80 down, then 0), laid out as
    faithfulness.teacher_trajectories returns them: times (K,), states (K, B, 1, 8, 8)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    times = torch.cat([(80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, torch.zeros(1).double()])
    x0, noise = torch.rand(count, 1, 8, 8).double() * 2 - 1, torch.randn(count, 1, 8, 8).double()
    return times, x0[None] + times[:, None, None, None, None] * noise[None]


class Store(torch.utils.data.Dataset):
    """The trajectories above as a store's items: {"states": (K, C, H, W), "times": (K,)}."""

    def __init__(self, times, states):
        self.times, self.states = times.float(), states.transpose(0, 1).float()

    def __len__(self):
        return len(self.states)

    def __getitem__(self, i):
        return {"states": self.states[i], "times": self.times}


def test_zero_generators_give_exactly_the_no_evolution_ratio():
    model = HKDModel(ModelConfig(**MODEL)).eval()
    times, states = trajectories()
    rows = faithfulness.measure(model, times, states)
    assert [r["t"] for r in rows] == times[:-1].tolist()  # every stored t > 0
    for r in rows:
        for key in [k for k in r if k.startswith("ratio_") and not k.startswith("ratio_still")]:
            assert r[key] == r[key.replace("ratio_", "ratio_still_")]
        assert r["endpoint_mse"] == r["endpoint_still_mse"]  # exp(0) = identity
    assert rows[0]["ratio_all"] == 0 and math.isnan(rows[0]["relative_all"])  # t = T: nothing to evolve
    assert all(r["relative_all"] == 1 for r in rows[1:])
    # the known value at one t, from the definition, with the model's own stages
    k = 2
    z_T, z_t = model.encode(states[0].float(), times[0]), model.encode(states[k].float(), times[k])
    expected = torch.stack(
        [(a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1) for a, b in zip(z_T, z_t, strict=True)]
    )
    got = [rows[k][f"ratio_level{level}"] for level in range(len(z_T))]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected.mean(1).double(), rtol=1e-5, atol=0)


def test_an_autonomous_encoder_on_a_constant_trajectory_is_consistent_and_evolution_breaks_it():
    """encoder_sees_noise=false and x_t = x_T for every t: E(x_t) = E(x_T), so r_0 = 0; a rotation moves it away."""
    model = HKDModel(ModelConfig(**MODEL, encoder_sees_noise=False)).eval()
    times, states = trajectories()
    states = states[:1].expand_as(states)
    rows = faithfulness.measure(model, times, states)
    assert all(r["ratio_still_all"] == 0 for r in rows)
    with torch.no_grad():
        for beta in model.propagator.betas:
            beta.fill_(0.05)
    rows = faithfulness.measure(model, times, states)
    assert all(r["ratio_all"] > 0 for r in rows[1:]) and rows[0]["ratio_all"] == 0


def test_training_a_few_steps_improves_endpoint_consistency(tmp_path):
    from hkd import train

    times, states = trajectories(count=32)
    data = Store(times, states)
    cfg = {
        "model": dict(MODEL),
        "train": dict(out=str(tmp_path), batch=8, epochs=6, lr=3e-3, ema=0, progress=False, sample_every=0),
    }
    result = train.train(cfg, dataset=data)
    before = faithfulness.measure(HKDModel(ModelConfig(**MODEL)).eval(), times, states)
    after = faithfulness.measure(result["model"].eval(), times, states)
    mean = lambda rows: sum(r["endpoint_mse"] for r in rows) / len(rows)  # noqa: E731
    assert mean(after) < mean(before)


def test_latent_consistency_term_lowers_the_measured_ratio(tmp_path):
    from hkd import train

    times, states = trajectories(count=32)
    data = Store(times, states)
    model = HKDModel(ModelConfig(**MODEL, generator_init="spread"))
    before = faithfulness.summary(faithfulness.measure(model.eval(), times, states))
    cfg = {
        "model": dict(MODEL, generator_init="spread"),
        "train": dict(out=str(tmp_path), batch=8, epochs=8, lr=3e-3, ema=0, progress=False, sample_every=0),
    }
    cfg["train"] |= dict(lambda3=10.0, lambda2=0.0, lambda1_start=1e-3, lambda1_end=1e-3)  # the term alone, almost
    result = train.train(cfg, dataset=data, model=model.train())
    after = faithfulness.summary(faithfulness.measure(result["model"].eval(), times, states))
    assert after["relative_mean"] < before["relative_mean"]


def test_run_writes_table_json_and_figure(tmp_path, monkeypatch):
    from hkd import metrics

    monkeypatch.setenv("HKD_CACHE_DIR", str(tmp_path / "cache"))  # the digits classifier, trained here once
    monkeypatch.setattr(metrics, "_CLASSIFIER", None)
    from hkd.data import DataConfig
    from hkd.teacher import TeacherConfig, build_net

    teacher = build_net(DataConfig(), TeacherConfig(model_channels=8, channel_mult=(1, 2)))
    teacher.img_channels, teacher.img_resolution = 1, 16
    teacher = teacher.eval().requires_grad_(False)
    model = HKDModel(ModelConfig(**(MODEL | dict(img_resolution=16)))).eval()
    written = faithfulness.run({"HKD": model, "baseline": model}, teacher, num=3, out_dir=tmp_path)
    assert [p.name for p in written] == ["faithfulness.md", "faithfulness.json", "faithfulness.png", "trajectories.png"]
    text = written[0].read_text()
    assert "### HKD" in text and "### baseline" in text and "relative_mean" in text
    import json

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    saved = json.loads(written[1].read_text(), parse_constant=refuse)  # the ratio undefined at T is null, not NaN
    assert saved["rows"]["HKD"][0]["relative_all"] is None


def test_latent_consistency_known_values_and_stop_gradient():
    from hkd.losses import latent_consistency

    model = HKDModel(ModelConfig(**MODEL))
    shapes = model.propagator.level_shapes
    z_t = [torch.randn(3, *shape) for shape in shapes]
    z_T = [(2 * z).requires_grad_() for z in z_t]
    target = [z.clone().requires_grad_() for z in z_t]
    latents = [torch.stack([a, b], 1).flatten(0, 1) for a, b in zip(target, z_T, strict=True)]  # (t, T) per row
    t = torch.tensor([5.0, 80.0]).repeat(3)
    loss = latent_consistency(model, latents, t, 2)  # A = 0: ||2 z - z||^2 / ||z||^2 = 1 at every level
    torch.testing.assert_close(loss, torch.ones(3))
    loss.sum().backward()
    assert all(z.grad is None or z.grad.abs().max() == 0 for z in target)  # sg(E(x_t)): no gradient to the target
    assert all(z.grad.abs().max() > 0 for z in z_T)
    # the evolution itself: with z_t = exp((t - T) A) z_T exactly, the term is zero
    with torch.no_grad():
        for beta in model.propagator.betas:
            beta.normal_(0, 0.1)
    z_T = [torch.randn(3, *shape) for shape in shapes]
    z_t = model.propagate(z_T, 80.0, 5.0)
    latents = [torch.stack([a, b], 1).flatten(0, 1) for a, b in zip(z_t, z_T, strict=True)]
    torch.testing.assert_close(latent_consistency(model, latents, t, 2), torch.zeros(3), atol=1e-10, rtol=0)


def test_decoded_trajectory_is_measured_against_the_teachers_denoised_estimate():
    """With zero generators the decoded Koopman state is D(E(x_T)) at every t; the MSE is the definition's."""
    model = HKDModel(ModelConfig(**MODEL)).eval()
    times, states = trajectories()
    teacher = lambda x, t: x / (1 + t**2)  # noqa: E731  (any denoiser: the measure only calls it)
    rows = faithfulness.measure(model, times, states, teacher)
    assert all(r["decoded_mse"] == r["decoded_still_mse"] for r in rows)
    k = 2
    with torch.no_grad():
        decoded = model.decode(model.encode(states[0].float(), float(times[0])))
        expected = (decoded.double() - teacher(states[k].float(), float(times[k])).double()).square().mean()
    assert math.isclose(rows[k]["decoded_mse"], float(expected), rel_tol=1e-6)
    assert "decoded_mse" not in faithfulness.measure(model, times, states)[0]  # no teacher, no decoded curve


def test_decoded_trajectory_term_lowers_the_measured_decoded_error(tmp_path):
    from hkd import train
    from hkd.data import DataConfig
    from hkd.teacher import TeacherConfig, load_teacher, train_teacher

    tiny = {"model_channels": 8, "channel_mult": [1, 2], "steps": 2, "batch_size": 8, "log_every": 1}
    quiet = lambda line: None  # noqa: E731
    train_teacher(DataConfig(name="digits", resolution=8), TeacherConfig(**tiny), tmp_path / "teacher", log=quiet)
    teacher = load_teacher(tmp_path / "teacher" / "teacher.pt")
    times, states = trajectories(count=32)
    before = faithfulness.summary(faithfulness.measure(HKDModel.from_teacher(teacher).eval(), times, states, teacher))
    cfg = {"train": dict(out=str(tmp_path / "hkd"), batch=8, epochs=8, lr=3e-3, ema=0, progress=False)}
    cfg["train"] |= dict(sample_every=0, teacher=str(tmp_path / "teacher" / "teacher.pt"), lambda4=10.0)
    cfg["train"] |= dict(lambda2=0.0, lambda1_start=1e-3, lambda1_end=1e-3)  # the term alone, almost
    result = train.train(cfg, dataset=Store(times, states))
    after = faithfulness.summary(faithfulness.measure(result["model"].eval(), times, states, teacher))
    assert after["decoded_mse_mean"] < before["decoded_mse_mean"]
