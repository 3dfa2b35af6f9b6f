"""Nothing from a file is executed, nothing is lost, nothing altered loads silently, runs stop and lock cleanly."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hkd import config, demo, files, metrics, trajectories
from hkd.cli import main
from hkd.errors import ConfigError, CorruptFileError, NonFiniteError, RunStopped, UserError
from hkd.model import HKDModel, ModelConfig

TINY_TEACHER = ["teacher.model_channels=4", "teacher.channel_mult=[1]", "teacher.steps=1", "teacher.batch_size=8"]
TINY_TEACHER += ["teacher.sample_grid=0", "teacher.log_every=1"]
SOLVER = ["trajectories.num_trajectories=4", "trajectories.num_steps=2", "trajectories.shard_size=2"]


class Plant:
    """A pickle with a side effect: unpickling it creates the folder `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "hkd-teacher", "step": 10**9, "payload": Plant(marker)}, path)


def run(argv, capsys):
    """hkd ARGV in this process: (exit code, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny teacher, its store, a tiny HKD model folder and a run folder with a checkpoint."""
    root = tmp_path_factory.mktemp("made")
    assert main(["train-teacher", "--out", str(root / "teacher"), "--device", "cpu", *TINY_TEACHER]) == 0
    args = ["trajectories", "--teacher", str(root / "teacher"), "--out", str(root / "store"), "--quiet"]
    assert main([*args, "--device", "cpu", *SOLVER]) == 0
    HKDModel(ModelConfig(img_resolution=8, img_channels=1, model_channels=4, channel_mult=(1,))).save_pretrained(
        root / "model"
    )
    return root


def train_args(root, out, *extra):
    run_settings = [f"train.store={root / 'store'}", f"train.teacher={root / 'teacher' / 'teacher.pt'}"]
    run_settings += [f"train.out={out}", "train.batch=2", "train.max_steps=1", "train.progress=false"]
    run_settings += ["train.sample_count=1", "train.time_samples=1"]
    return ["train", *TINY_TEACHER, *SOLVER, *run_settings, *extra]


# ---------------------------------------------------------------------------------------------------------------
# Nothing from a file is executed


def test_a_planted_pickle_never_runs_in_any_place_a_command_reads(made, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "EXECUTED"
    places = {}

    model = tmp_path / "model"  # a model folder whose weights are a pickle
    model.mkdir()
    (model / "config.json").write_text((made / "model" / "config.json").read_text())
    plant(model / "model.safetensors", marker)
    places["model folder"] = ["generate", "--model", model, "--out", tmp_path / "g"]

    plant(tmp_path / "run" / "checkpoint.pt", marker)  # a run checkpoint
    places["checkpoint"] = [*train_args(made, tmp_path / "run"), "--resume"]

    plant(tmp_path / "teacher" / "teacher.pt", marker)  # a teacher
    places["teacher"] = ["trajectories", "--teacher", tmp_path / "teacher", "--out", tmp_path / "s", *SOLVER]
    places["teacher of eval"] = ["eval", "--model", made / "model", "--teacher", tmp_path / "teacher", "--num", 2]
    places["teacher of eval"] += ["--out", tmp_path / "e"]

    shard_store = tmp_path / "store"  # a store whose shard is a pickled object array, with its true checksum
    manifest = json.loads((made / "store" / "manifest.json").read_text())
    shard_store.mkdir()
    np.save(shard_store / "shard_00000.npy", np.array([Plant(marker)], dtype=object), allow_pickle=True)
    manifest["shards"]["shard_00000.npy"]["sha256"] = hashlib.sha256(
        (shard_store / "shard_00000.npy").read_bytes()
    ).hexdigest()
    (shard_store / "manifest.json").write_text(json.dumps(manifest))
    places["store (--verify)"] = ["trajectories", "--verify", shard_store]
    places["store (train)"] = train_args(made, tmp_path / "run2", f"train.store={shard_store}")

    plant(tmp_path / "demo" / "teacher" / "teacher.pt", marker)  # an earlier demo's folder
    places["demo folder"] = ["demo", "--quick", "--out", tmp_path / "demo", "--device", "cpu"]

    for name, argv in places.items():
        code, err = run(argv, capsys)
        assert not marker.exists(), f"{name}: the pickle ran"
        assert code == 2 and "Traceback" not in err and err.count("\n") == 1, (name, code, err)

    # the digits classifier's cache: a planted file is replaced by a retrained classifier, never unpickled
    monkeypatch.setenv("HKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "_CLASSIFIER", None)
    plant(metrics.classifier_cache(), marker)
    assert isinstance(metrics.digits_classifier(), metrics.DigitsClassifier)
    assert not marker.exists()
    assert files.load(metrics.classifier_cache())["model"].keys() == metrics.digits_classifier().state_dict().keys()


# ---------------------------------------------------------------------------------------------------------------
# Nothing hkd did not create is deleted; nothing altered loads


def test_fresh_deletes_only_a_folder_the_demo_marked(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, err = run(["demo", "--fresh", "--quick", "--out", mine, "--device", "cpu"], capsys)
    assert code == 2 and "not made by `hkd demo`" in err and (mine / "thesis.tex").read_text() == "years of work"

    ours = tmp_path / "ours"
    ours.mkdir()
    demo.claim(ours, fresh=False)  # a new, empty folder becomes the demo's
    (ours / "teacher").mkdir()
    (ours / "teacher" / "teacher.pt").write_bytes(b"old")
    demo.claim(ours, fresh=True)
    assert sorted(p.name for p in ours.iterdir()) == [demo.MARKER]

    (mine / "teacher").mkdir()  # a non-empty folder without the marker is used, never marked
    demo.claim(mine, fresh=False)
    assert not (mine / demo.MARKER).exists()


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_checkpoints_and_model_weights_are_errors(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    weights = torch.linspace(0, 1, 4096)
    files.save(path, {"step": 3, "w": weights})
    offset = path.read_bytes().find(weights[2000:2004].numpy().tobytes())
    assert offset > 0
    flip(path, offset + 1)
    with pytest.raises(CorruptFileError, match="checkpoint.pt.*checksum differs"):
        files.load(path)

    legacy = tmp_path / "legacy.pt"  # a file from before checksums still loads
    torch.save({"step": 1, "w": weights}, legacy)
    assert files.load(legacy)["step"] == 1

    model = HKDModel(ModelConfig(img_resolution=8, img_channels=1, model_channels=4, channel_mult=(1,)))
    model.save_pretrained(tmp_path / "model")
    restored = HKDModel.from_pretrained(tmp_path / "model")
    for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    file = tmp_path / "model" / "model.safetensors"
    flip(file, len(file.read_bytes()) - 3)
    with pytest.raises(CorruptFileError, match="model.safetensors is corrupt: its checksum differs"):
        HKDModel.from_pretrained(tmp_path / "model")
    code, err = run(["generate", "--model", tmp_path / "model", "--out", tmp_path / "g"], capsys)
    assert code == 2 and "checksum differs" in err and not (tmp_path / "g" / "grid.png").exists()


def test_model_sizes_are_checked_before_anything_is_allocated(tmp_path):
    model = HKDModel(ModelConfig(img_resolution=8, img_channels=1, model_channels=4, channel_mult=(1,)))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["model"]["img_resolution"] = 4096  # per-position generators: gigabytes if built
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CorruptFileError, match="does not match config.json.*shapes"):
        HKDModel.from_pretrained(tmp_path)
    saved["model"]["img_resolution"] = 65536  # hundreds of GB: above the limit a config may declare
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"model.img_resolution must be an integer in \[1, 8192\] \(hkd's limit\)"):
        HKDModel.from_pretrained(tmp_path)


def test_a_checkpoint_with_nonfinite_weights_never_replaces_the_last_good_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    files.save(path, {"step": 4, "model": {"w": torch.ones(3)}})
    with pytest.raises(NonFiniteError, match="model.w"):
        files.save(path, {"step": 5, "model": {"w": torch.tensor([1.0, float("inf"), 0.0])}})
    assert files.load(path)["step"] == 4 and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


class Trajectories(torch.utils.data.Dataset):
    """Stored-trajectory-shaped items: states (5, 1, 8, 8) at times 80 ... 0."""

    def __init__(self, count):
        self.times = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0])
        x0 = torch.rand(count, 1, 1, 8, 8) * 2 - 1
        self.states = x0 + self.times[:, None, None, None] * torch.randn(count, 1, 1, 8, 8)

    def __len__(self):
        return len(self.states)

    def __getitem__(self, i):
        return {"states": self.states[i], "times": self.times}


def test_training_stops_on_nonfinite_weights_and_keeps_the_last_good_checkpoint(tmp_path):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from hkd import runstate, train

    def poison(optimizer, args, kwargs):  # the 5th update leaves an inf weight behind a finite loss
        poison.calls += 1
        if poison.calls == 5:
            optimizer.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")

    poison.calls = 0
    settings = dict(out=str(tmp_path / "run"), batch=8, epochs=4, checkpoint_every=1, sample_every=0, progress=False)
    model = HKDModel(ModelConfig(img_resolution=8, img_channels=1, model_channels=4, channel_mult=(1,)))
    handle = register_optimizer_step_post_hook(poison)
    try:
        expected = r"weights are not finite at step 5.*checkpoint\.pt \(step 4\)"
        with pytest.raises(runstate.NonFiniteLoss, match=expected):
            train.train({"train": settings}, dataset=Trajectories(16), model=model)
    finally:
        handle.remove()
    state = files.load(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 4 and not files.nonfinite(state)


# ---------------------------------------------------------------------------------------------------------------
# Writes: atomic, umask, stale temporaries; locks; stops


def test_atomic_write_respects_the_umask_and_a_lock_cleans_what_a_kill_left(tmp_path):
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        previous = os.umask(umask)
        try:
            path = files.atomic_write(tmp_path / f"f{umask:o}.txt", "x")
        finally:
            os.umask(previous)
        assert path.stat().st_mode & 0o777 == mode

    # a writer killed (-9) in the middle of a save leaves its temporary file, never a half-written target
    files.save(tmp_path / "run" / "checkpoint.pt", {"step": 1})
    script = (
        "import os, signal, torch; from hkd import files\n"
        "def die(file): file.write(b'partial'); file.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        f"files.atomic_write({str(tmp_path / 'run' / 'checkpoint.pt')!r}, die)\n"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    assert files.load(tmp_path / "run" / "checkpoint.pt")["step"] == 1
    stale = list((tmp_path / "run").glob(f".*{files.TMP_SUFFIX}"))
    assert len(stale) == 1
    (tmp_path / "run" / ".notes.tmp").write_text("the user's")  # not hkd's: kept
    with files.run_lock(tmp_path / "run"):
        assert not stale[0].exists() and (tmp_path / "run" / ".notes.tmp").exists()


def test_one_run_per_folder(made, tmp_path, capsys):
    with files.run_lock(tmp_path / "run"):
        with pytest.raises(UserError, match=f"in use by another hkd run .pid {os.getpid()}"):
            with files.run_lock(tmp_path / "run"):
                pass
        code, err = run(train_args(made, tmp_path / "run"), capsys)
        assert code == 2 and "in use by another hkd run" in err
        code, err = run(["train-teacher", "--out", tmp_path / "run", *TINY_TEACHER], capsys)
        assert code == 2 and "in use by another hkd run" in err
    with files.run_lock(tmp_path / "run"):  # released with the run
        pass


def test_resume_refuses_a_changed_config_and_says_what_changed(made, tmp_path, capsys):
    assert run(train_args(made, tmp_path / "run"), capsys)[0] == 0
    code, err = run([*train_args(made, tmp_path / "run", "train.lr=1e-4"), "--resume"], capsys)
    assert code == 2 and "train.lr: 0.001 -> 0.0001" in err
    code, err = run([*train_args(made, tmp_path / "run", "train.max_steps=2"), "--resume"], capsys)
    assert code == 0, err  # the step budget may change
    assert files.load(tmp_path / "run" / "checkpoint.pt")["step"] == 2


def test_sigterm_checkpoints_then_exits_143(tmp_path):
    args = ["train-teacher", "--out", str(tmp_path), "--device", "cpu", *TINY_TEACHER, "teacher.steps=100000"]
    args += ["teacher.checkpoint_every=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "hkd.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)  # fmt: skip
    assert process.stdout.readline().startswith("step 1/")  # training is under way
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step" in err and "Traceback" not in err
    assert files.load(tmp_path / "teacher.pt")["step"] >= 1


def test_run_stopped_is_its_exit_code_in_the_cli(monkeypatch, capsys):
    from hkd import train

    def stopped(*args, **kwargs):
        raise RunStopped("stopped by SIGINT at step 3", signal.SIGINT)

    monkeypatch.setattr(train, "train", stopped)
    assert main(["train"]) == 130 and "stopped by SIGINT" in capsys.readouterr().err


def test_a_stopped_demo_says_to_run_it_again_not_to_pass_resume(monkeypatch, capsys, tmp_path):
    """hkd train's stop message names --resume; hkd demo has no such option (it resumes when run again)."""
    from hkd import demo
    from hkd.files import RESUME_HINT

    def stopped(*args, **kwargs):
        raise RunStopped(f"stopped by SIGTERM at step 3: checkpoint.pt written; {RESUME_HINT}")

    monkeypatch.setattr(demo, "run", stopped)
    assert main(["demo", "--out", str(tmp_path)]) == 143
    err = capsys.readouterr().err
    assert "run the same command again to continue" in err and "--resume" not in err


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_trajectory_workers_die_with_their_parent(tmp_path):
    script = (
        "import time, torch\n"
        "from hkd.trajectories import TrajectoryConfig, write_store\n"
        "class Slow(torch.nn.Module):\n"
        "    img_channels, img_resolution, identity = 1, 4, {'source': 'test', 'config': {}, 'hash': '0'}\n"
        "    def forward(self, x, sigma):\n"
        "        time.sleep(0.5)\n"
        "        return x\n"
        "cfg = TrajectoryConfig(num_trajectories=40, num_steps=50, shard_size=2, batch_size=2)\n"
        f"write_store(Slow(), {str(tmp_path)!r}, cfg, workers=2, progress=False)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while len(children := _children(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(children) >= 2, "the workers did not start"
    parent.kill()  # -9: no handler runs in the parent
    parent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(c) for c in children)


# ---------------------------------------------------------------------------------------------------------------
# The store and the config


def test_store_times_and_shard_names_are_checked(made, tmp_path):
    import shutil

    shutil.copytree(made / "store", tmp_path / "s")
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    altered = {**manifest, "times": [t * 1.01 for t in manifest["times"]]}
    path.write_text(json.dumps(altered))
    assert any("times differ from the solver's grid" in p for p in trajectories.verify_store(tmp_path / "s"))
    with pytest.raises(CorruptFileError, match="times differ"):
        trajectories.TrajectoryDataset(tmp_path / "s")

    escaping = dict(manifest, shards={"../outside/x.npy": manifest["shards"]["shard_00000.npy"]})
    path.write_text(json.dumps(escaping))
    with pytest.raises(CorruptFileError, match="plain file names"):
        trajectories.verify_store(tmp_path / "s")
    with pytest.raises(CorruptFileError, match="plain file names"):
        trajectories.TrajectoryDataset(tmp_path / "s")


def test_config_errors_name_the_key_and_the_closest_valid_one():
    assert config.load("digits", ["train.lr=1e-4", "teacher.lr=5E-3"]).train.lr == 1e-4
    assert config.parse_yaml("[1e-4, -2.5e+3, 1_000, .5e1]") == [1e-4, -2500.0, 1000, 5.0]
    with pytest.raises(ConfigError, match="unknown config section 'trian' .did you mean train"):
        config.load("digits", ["trian.batch=8"])
    with pytest.raises(ConfigError, match="unknown key train.bacth .did you mean train.batch"):
        config.load("digits", ["train.bacth=8"])
    with pytest.raises(ConfigError, match="train.lr must be a number, got 'fast'"):
        config.load("digits", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="model.channel_mult must be a list of integers"):
        config.load("digits", ["model.channel_mult=[1, two]"])
    with pytest.raises(ConfigError, match="train.max_steps must be >= 1"):
        config.load("digits", ["train.max_steps=0"])
    with pytest.raises(ConfigError, match="train.adam_betas must be a list of 2"):
        config.load("digits", ["train.adam_betas=[0.9]"])
    # every section is a Section: built directly, it is checked the same way
    with pytest.raises(ConfigError, match="trajectories.batch_size must be >= 1"):
        trajectories.TrajectoryConfig(batch_size=0)
    assert ModelConfig(channel_mult=[1, 2]).channel_mult == (1, 2) and isinstance(ModelConfig(dropout=0).dropout, float)
    assert set(config.sections()) == {"data", "teacher", "trajectories", "model", "train"}
    changed = config.changes(
        config.load("digits").raw, config.load("digits", ["train.lr=0.002", "model.clock=log"]).raw
    )
    assert sorted(changed) == ["model.clock: 'identity' -> 'log'", "train.lr: 0.001 -> 0.002"]
