import math
import os
import signal
import socket

import pytest
import torch

from hkd import files, losses, runstate, train
from hkd.config import ConfigError
from hkd.edm import time_steps
from hkd.errors import RunStopped

# Tiny sizes: the whole file runs in about a minute on 2 shared cores.
MODEL = dict(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1)


pytestmark = pytest.mark.usefixtures("one_thread")


class Trajectories(torch.utils.data.Dataset):
    """Synthetic PF-ODE trajectories of 8x8 digits laid out like a store (times decreasing from T = 80 on the EDM
    grid, then x_eps at t = 0): for a point mass at x_0 the PF-ODE is exactly x_t = x_0 + t n."""

    def __init__(self, count: int = 64, steps: int = 6, seed: int = 0):
        from sklearn.datasets import load_digits

        x0 = torch.tensor(load_digits().images[:count], dtype=torch.float32)[:, None] / 8 - 1
        self.times = time_steps(steps).float()
        noise = torch.randn(count, 1, *x0.shape[1:], generator=torch.Generator().manual_seed(seed))
        self.states = x0[:, None] + self.times[None, :, None, None, None] * noise

    def __len__(self):
        return len(self.states)

    def __getitem__(self, i):
        return {"states": self.states[i], "times": self.times}


def config(tmp_path, name="run", **train_overrides):
    settings = dict(
        out=str(tmp_path / name), batch=8, epochs=4, log_every=5, checkpoint_every=1000, sample_every=0,
        sample_count=4, progress=False, seed=int(torch.randint(0, 2**31, ())),
    )  # fmt: skip
    return {"model": dict(MODEL), "train": settings | train_overrides}


def parameters(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a, b, **tolerance):
    assert a.keys() == b.keys()
    for key in a:
        message = lambda text, key=key: f"{key}: {text}"
        torch.testing.assert_close(a[key], b[key], msg=message, **(tolerance or dict(rtol=0, atol=0)))


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1 pieces


def test_time_sampling_on_the_grid_never_feeds_x_eps():
    grid = torch.tensor([80.0, 40.0, 10.0, 2.0, 0.5, 0.002, 0.0], dtype=torch.float64)
    u = torch.rand(20000, 3, dtype=torch.float64)
    index = losses.loss_time_indices(grid.expand(20000, -1), u, "uniform")
    t = 0.002 + u * (80 - 0.002)  # t ~ U[eps, T], then the nearest stored state other than x_eps
    torch.testing.assert_close(index, (grid[:-1] - t[..., None]).abs().argmin(-1))
    # probability of a grid point = length of its cell (midpoints to neighbours) / (T - eps)
    mid = torch.cat([grid[:1], (grid[1:-1] + grid[:-2]) / 2, grid[-2:-1]])
    expected = (mid[:-1] - mid[1:]) / (80 - 0.002)
    frequency = torch.bincount(index.flatten(), minlength=7).double() / index.numel()
    torch.testing.assert_close(frequency[:-1], expected, atol=0.01, rtol=0)
    assert frequency[-1] == 0
    # grid: uniform over the stored states but x_eps, wherever x_eps sits
    shuffled = grid[torch.randperm(7)]
    index = losses.loss_time_indices(shuffled.expand(20000, -1), u, "grid")
    frequency = torch.bincount(index.flatten(), minlength=7).double() / index.numel()
    expected = torch.where(shuffled == 0, 0.0, 1 / 6).double()
    torch.testing.assert_close(frequency, expected, atol=0.01, rtol=0)


class Recorder(torch.nn.Module):
    """A 'model' that records what it is given and returns x_t, so the loss is a known function of the inputs."""

    def forward(self, x_t, t):
        self.x_t, self.t = x_t, t
        return x_t * 1.0


@pytest.mark.parametrize("intermediate", [0, 4])
def test_trajectory_loss_feeds_stored_states_at_sampled_times_plus_T(intermediate):
    data = Trajectories(count=3)
    states, times = data.states[:3], data.times.expand(3, -1)
    u = torch.rand(3, intermediate, dtype=torch.float64)
    model = Recorder()
    distance = losses.Distance("none")
    loss = losses.trajectory_loss(model, states, times, u, distance, 1.0, "uniform")
    s = intermediate + 1
    assert model.x_t.shape == (3 * s, 1, 8, 8) and model.t.shape == (3 * s,)
    index = torch.cat([losses.loss_time_indices(times, u, "uniform"), torch.zeros(3, 1, dtype=torch.long)], 1)
    for b in range(3):
        for j in range(s):
            k = index[b, j]
            assert model.t[b * s + j] == data.times[k]
            torch.testing.assert_close(model.x_t[b * s + j], states[b, k], rtol=0, atol=0)
        assert model.t[b * s + s - 1] == data.times.max()  # the last sample of every trajectory is T
    expected = torch.stack([(model.x_t[b * s + j] - states[b, -1]).square().mean() for b in range(3) for j in range(s)])
    torch.testing.assert_close(loss, expected.mean())


def test_config_mistakes_are_named_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="train.bacth"):
        train.train({"train": {"bacth": 4}}, dataset=Trajectories())
    with pytest.raises(ValueError, match="train.perceptual must be one of"):
        train.train(config(tmp_path, perceptual="lpip"), dataset=Trajectories())
    with pytest.raises(ValueError, match="precision=fp16 needs a GPU"):
        train.train(config(tmp_path, precision="fp16", device="cpu"), dataset=Trajectories())
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        train.train(config(tmp_path), resume=True, dataset=Trajectories())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train.train(config(tmp_path, batch=128), dataset=Trajectories())


# ---------------------------------------------------------------------------------------------------------------
# Runs


def test_smoke_run_lowers_the_loss_and_writes_the_run_folder(tmp_path):
    cfg = config(tmp_path, epochs=8, log_every=8, sample_every=32, batch=8, lr=3e-3)
    result = train.train(cfg, dataset=Trajectories(count=32))  # 4 steps per epoch, 32 steps
    losses = [loss for _, loss in result["losses"]]
    assert result["step"] == 32 and len(losses) == 4 and all(map(math.isfinite, losses))
    assert losses[-1] < 0.8 * losses[0], losses
    out = tmp_path / "run"
    assert (out / "samples" / "step_00000032.png").is_file()
    state = files.load(out / "checkpoint.pt")
    assert state["step"] == 32 and state["epoch"] == 8
    assert state["scheduler"]["last_epoch"] == 8
    torch.testing.assert_close(
        torch.tensor(state["optimizer"]["param_groups"][0]["lr"]), torch.tensor(1e-3 * 3 * 0.95**8)
    )
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss") and len(rows) == 5
    from hkd.model import HKDModel

    reloaded = HKDModel.from_pretrained(out / "model")  # the final EMA model
    assert_same(parameters(reloaded), parameters(result["ema"]))


@pytest.mark.slow
def test_a_few_hundred_steps_lower_the_loss(tmp_path):
    cfg = config(tmp_path, epochs=40, log_every=25, batch=16, lr=2e-3)
    result = train.train(cfg, dataset=Trajectories(count=128))  # 8 steps per epoch, 320 steps
    losses = [loss for _, loss in result["losses"]]
    assert result["step"] == 320
    assert losses[-1] < 0.5 * losses[0], losses


class SignalAt(torch.utils.data.Dataset):
    """Wraps a dataset; sends SIGTERM to this process (as `kill` would) when item number `at` is loaded."""

    def __init__(self, dataset, at):
        self.dataset, self.at, self.calls = dataset, at, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.dataset[i]


def test_resume_after_sigterm_is_exact(tmp_path):
    data = Trajectories(count=32)  # 4 steps of 8 per epoch: the runs cross epoch boundaries (sampler, lr decay)
    straight = train.train(config(tmp_path, "straight", seed=3, max_steps=14), dataset=data)
    # the same run, killed by SIGTERM while loading a batch (about step 7): it finishes that step, checkpoints, stops
    with pytest.raises(RunStopped, match="stopped by SIGTERM at step .*checkpoint.pt written") as stopped:
        train.train(config(tmp_path, "resumed", seed=3, max_steps=14), dataset=SignalAt(data, at=6 * 8 + 2))
    assert stopped.value.exit_code == 128 + signal.SIGTERM  # what `hkd train` exits with
    assert 5 <= files.load(tmp_path / "resumed" / "checkpoint.pt")["step"] < 14
    torch.manual_seed(987654321)  # a global RNG state unlike the first run's: it must not matter
    resumed = train.train(config(tmp_path, "resumed", seed=3, max_steps=14), dataset=data, resume=True)
    assert resumed["step"] == 14
    assert_same(parameters(resumed["model"]), parameters(straight["model"]))
    assert_same(parameters(resumed["ema"]), parameters(straight["ema"]))
    assert resumed["losses"] == straight["losses"]
    a_b = ("straight", "resumed")
    a, b = (files.load(tmp_path / run / "checkpoint.pt") for run in a_b)
    assert_same(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    assert a["scheduler"] == b["scheduler"]
    columns = [[row.split(",")[:3] for row in (tmp_path / run / "log.csv").read_text().splitlines()] for run in a_b]
    assert columns[0] == columns[1] and len(columns[0]) == 4  # header + steps 5, 10, 14 (step, epoch, loss)
    with pytest.raises(ValueError, match="exists: pass --resume"):
        train.train(config(tmp_path, "resumed", seed=3), dataset=data)


class NaNAt(torch.nn.Module):
    def __init__(self, model, at):
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def forward(self, x_t, t):
        self.calls += 1
        out = self.model(x_t, t)
        return out * math.nan if self.calls == self.at else out


def test_nonfinite_loss_stops_keeping_the_last_good_checkpoint_or_is_skipped(tmp_path):
    from hkd.model import HKDModel, ModelConfig

    data = Trajectories(count=16)
    model = NaNAt(HKDModel(ModelConfig(**(MODEL | {"channel_mult": (1, 2)}))), at=6)
    with pytest.raises(runstate.NonFiniteLoss, match=r"nan at step 5 .*checkpoint\.pt \(step 4\)"):
        train.train(config(tmp_path, checkpoint_every=2, epochs=5), dataset=data, model=model)
    state = files.load(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())

    model = NaNAt(HKDModel(ModelConfig(**(MODEL | {"channel_mult": (1, 2)}))), at=6)
    result = train.train(config(tmp_path, "skip", on_nonfinite="skip", epochs=5), dataset=data, model=model)
    assert result["step"] == 10 and result["skipped"] == 1
    assert all(torch.isfinite(v).all() for v in result["model"].state_dict().values())


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_backends_change_nothing_but_speed(tmp_path, backend):
    from hkd.ops import _backend

    if not _backend.usable(backend, torch.device("cpu")):
        pytest.skip(f"backend {backend} is not usable here (see hkd info)")
    if backend == "triton":
        pytest.importorskip("hkd.kernels.spectral", reason="the Triton spectral kernels are not installed")
    data = Trajectories(count=16)
    runs = {}
    for name in ("reference", backend):
        cfg = config(tmp_path, name, seed=5, max_steps=3, batch=4)
        cfg["model"]["backend"] = name
        runs[name] = parameters(train.train(cfg, dataset=data)["model"])
    assert_same(runs[backend], runs["reference"], rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu_trains_and_resumes(tmp_path, precision):
    data = Trajectories(count=32)
    cfg = config(tmp_path, precision=precision, device="cuda", max_steps=6, checkpoint_every=3)
    result = train.train(cfg, dataset=data)
    losses = [loss for _, loss in result["losses"]]
    assert result["step"] == 6 and all(map(math.isfinite, losses))
    state = files.load(tmp_path / "run" / "checkpoint.pt")
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0  # the GradScaler's state travels with the checkpoint
    else:
        assert state["scaler"] == {}  # bf16 needs no loss scaling
    cfg["train"]["max_steps"] = 8
    assert train.train(cfg, dataset=data, resume=True)["step"] == 8


# ---------------------------------------------------------------------------------------------------------------
# DDP


def _ddp_worker(rank, world, port, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        result = train.train(cfg, dataset=Trajectories(count=32))
        if rank == 0:
            torch.save({"model": parameters(result["model"]), "losses": result["losses"]}, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_ddp_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(tmp_path, "ddp", seed=11, max_steps=6, batch=8)
    mp.spawn(_ddp_worker, args=(2, port, cfg, str(tmp_path / "ddp.pt")), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt")
    torch.manual_seed(0)
    single = train.train(config(tmp_path, "single", seed=11, max_steps=6, batch=8), dataset=Trajectories(count=32))
    assert_same(ddp["model"], parameters(single["model"]), rtol=1e-4, atol=1e-5)
    for (step_a, loss_a), (step_b, loss_b) in zip(ddp["losses"], single["losses"], strict=True):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# End to end: teacher -> store -> `hkd train`


def test_hkd_train_command_on_a_real_store(tmp_path, capsys):
    from hkd import cli, config, teacher, trajectories

    sizes = ["teacher.model_channels=8", "teacher.channel_mult=[1, 2]", "teacher.batch_size=16", "teacher.steps=2"]
    sizes += ["teacher.sample_grid=0", "teacher.log_every=1"]
    solver = ["trajectories.num_trajectories=24", "trajectories.num_steps=4", "trajectories.shard_size=12"]
    cfg = config.load("digits", sizes + solver)
    teacher.train_teacher(cfg.data, cfg.teacher, tmp_path / "teacher", log=lambda line: None)
    denoiser = teacher.load_teacher(tmp_path / "teacher")
    trajectories.write_store(denoiser, tmp_path / "store", cfg.trajectories, progress=False)
    run = [f"train.store={tmp_path / 'store'}", f"train.teacher={tmp_path / 'teacher' / 'teacher.pt'}"]
    run += [f"train.out={tmp_path / 'hkd'}", "train.batch=8", "train.epochs=2", "train.progress=false"]
    run += ["train.sample_count=4", "train.checkpoint_every=2"]
    assert cli.main(["train", *solver, *run]) == 0
    state = files.load(tmp_path / "hkd" / "checkpoint.pt")
    assert state["step"] == 6 and (tmp_path / "hkd" / "samples" / "step_00000006.png").is_file()
    assert "wrote" in capsys.readouterr().out
    # a store made with other solver settings than the config's is refused, naming the difference
    assert cli.main(["train", *solver, *run, "trajectories.num_steps=5", f"train.out={tmp_path / 'b'}"]) == 2
    assert "num_steps" in capsys.readouterr().err
    assert cli.main(["train", *solver, *run, "train.batchsize=3"]) == 2
    assert "train.batchsize" in capsys.readouterr().err

    # online: fresh trajectories from the teacher instead of the store; resuming is exact there too
    online = [*solver, *run, "train.online=true", "train.store=null", "train.sample_every=0"]
    straight = config.load("digits", [*online, f"train.out={tmp_path / 'online'}", "train.max_steps=4"])
    assert train.train(straight)["step"] == 4
    stopped = config.load("digits", [*online, f"train.out={tmp_path / 'online2'}", "train.max_steps=2"])
    assert train.train(stopped)["step"] == 2
    resumed = train.train(config.load("digits", [*online, f"train.out={tmp_path / 'online2'}", "train.max_steps=4"]),
                          resume=True)  # fmt: skip
    a, b = (files.load(tmp_path / run / "checkpoint.pt") for run in ("online", "online2"))
    assert resumed["step"] == 4
    assert_same(a["model"], b["model"])
    assert_same(a["ema"], b["ema"])
