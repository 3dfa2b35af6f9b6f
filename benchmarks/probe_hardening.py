"""Probe `hkd` as a careless user and an attacker would: bad arguments, planted pickles, flipped bytes, kills.

    python benchmarks/probe_hardening.py [--out FILE.json] [--only files|explore|leftovers] [--timeout S]

Runs every probe against the hkd that Python imports (PYTHONPATH=... selects another checkout, e.g. an older
commit unpacked with `git archive`), and prints one line per probe with its outcome:

    clean       exit code 2 and one line on stderr, no traceback
    usage       exit code 2 with argparse's usage block (several lines), no traceback
    traceback   an exception escaped to the user
    accepted    nonsense accepted: exit 0, or the command started its work
    executed    a planted pickle ran its code
    data loss   a file hkd did not make, or the last good checkpoint, was deleted or overwritten
    silent      an altered file or store was used without a word, or NaN/inf made a result
    hang        still running after the probe's timeout
    unbounded   a refused file made the process grow beyond 64 MiB + 4x the file's size (peak resident memory), or
                the explorer started more than 64 threads for 100 silent connections (a capped server: at most
                32 connections, each a thread and its head timer)
    left a folder  a refused run created its --out folder (nothing replaced, but litter)
    ok          a protection works (files kept, exit code 143, workers gone, umask respected)

The bad-argument table is tests/test_cli_errors.py's CASES. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_cli_errors import CASES, make_paths  # noqa: E402 (the bad-argument table and its paths)
from test_hardening import SOLVER, Plant, train_args  # noqa: E402 (the tiny runs and the planted pickle)
from test_hardening import TINY_TEACHER as TINY  # noqa: E402


class WorkStarted(Exception):  # noqa: N818
    pass


def cli(argv):
    """(exit code or 'traceback', stderr) of hkd ARGV run in this process."""
    from hkd.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit:
            code = exit.code
        except WorkStarted:
            code = "work"
        except Exception:  # noqa: BLE001 (what the user would see as a traceback)
            code = "traceback"
    return code, err.getvalue()


def classify(code, err) -> str:
    if code == "traceback" or "Traceback" in err:
        return "traceback"
    if code == 2:
        return "clean" if err.count("\n") == 1 else "usage"
    return "accepted"


def fixtures(root: Path) -> dict[str, str]:
    """A tiny teacher and its store in root, and the paths of tests/test_cli_errors.py's CASES."""
    from hkd.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train-teacher", "--out", str(root / "teacher"), "--device", "cpu", *TINY]) == 0
        args = ["trajectories", "--teacher", str(root / "teacher"), "--out", str(root / "store"), "--quiet"]
        assert main([*args, "--device", "cpu", *SOLVER]) == 0
    return make_paths(root)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------------------------
# The special probes: each returns its outcome


def pickle_places(root: Path, tmp: Path) -> dict[str, str]:
    from hkd import metrics

    marker = tmp / "EXECUTED"
    places = {}

    def planted(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": "hkd-teacher", "step": 10**9, "payload": Plant(marker)}, path)
        return path

    model = tmp / "pmodel"
    model.mkdir()
    shutil.copy(root / "model" / "config.json", model)
    planted(model / "model.safetensors")
    places["pickle in a model folder (generate)"] = ["generate", "--model", model, "--out", tmp / "g"]
    planted(tmp / "prun" / "checkpoint.pt")
    places["pickle as a run checkpoint (train --resume)"] = [*train_args(root, tmp / "prun"), "--resume"]
    planted(tmp / "pteacher" / "teacher.pt")
    places["pickle as a teacher (trajectories)"] = ["trajectories", "--teacher", tmp / "pteacher", "--out", tmp / "s"]
    store = tmp / "pstore"
    store.mkdir()
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    np.save(store / "shard_00000.npy", np.array([Plant(marker)], dtype=object), allow_pickle=True)
    digest = hashlib.sha256((store / "shard_00000.npy").read_bytes()).hexdigest()
    manifest["shards"]["shard_00000.npy"]["sha256"] = digest
    (store / "manifest.json").write_text(json.dumps(manifest))
    places["pickle as a store shard (--verify)"] = ["trajectories", "--verify", store]
    places["pickle as a store shard (train)"] = train_args(root, tmp / "prun2", f"train.store={store}")
    planted(tmp / "pdemo" / "teacher" / "teacher.pt")
    places["pickle in a demo folder (demo re-run)"] = ["demo", "--quick", "--out", tmp / "pdemo", "--device", "cpu"]

    outcomes = {}
    for name, argv in places.items():
        code, err = cli(argv)
        outcomes[name] = "executed" if marker.exists() else classify(code, err)
        if marker.exists():
            marker.rmdir()
    os.environ["HKD_CACHE_DIR"] = str(tmp / "cache")
    metrics._CLASSIFIER = None
    if hasattr(metrics, "classifier_cache"):
        cache = metrics.classifier_cache()
    else:  # the recipe of the older code
        images, _ = metrics.digits_dataset()
        recipe = hashlib.sha256(images.numpy().tobytes() + Path(metrics.__file__).read_bytes()).hexdigest()[:16]
        cache = tmp / "cache" / f"digits_classifier_{recipe}.pt"
    planted(cache)
    try:
        metrics.digits_classifier()
        outcome = "ok"
    except Exception:  # noqa: BLE001
        outcome = "traceback"
    outcomes["pickle as the classifier cache (eval)"] = "executed" if marker.exists() else outcome
    return outcomes


def fresh_on_a_user_folder(paths: dict, tmp: Path) -> str:
    user = tmp / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    code, err = cli(["demo", "--quick", "--fresh", "--out", user, "--device", "cpu"])
    return "data loss" if not (user / "thesis.tex").exists() else classify(code, err)


def nonfinite_weights(tmp: Path) -> str:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from hkd import files, train
    from hkd.model import HKDModel, ModelConfig

    class Trajectories(torch.utils.data.Dataset):
        times = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0])
        states = torch.rand(16, 1, 1, 8, 8) + times[:, None, None, None] * torch.randn(16, 1, 1, 8, 8)

        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"states": self.states[i], "times": self.times}

    def poison(optimizer, args, kwargs):
        poison.calls += 1
        if poison.calls == 5:
            optimizer.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")

    poison.calls = 0
    settings = dict(out=str(tmp / "nf"), batch=8, epochs=4, checkpoint_every=1, sample_every=0, progress=False)
    model = HKDModel(ModelConfig(img_resolution=8, img_channels=1, model_channels=4, channel_mult=(1,)))
    handle = register_optimizer_step_post_hook(poison)
    with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
        train.train({"train": settings}, dataset=Trajectories(), model=model)
    handle.remove()
    state = files.load(tmp / "nf" / "checkpoint.pt")
    finite = all(torch.isfinite(v).all() for v in state["model"].values())
    return "ok" if finite else "data loss"


def flipped_checkpoint(tmp: Path) -> str:
    from hkd import files

    path = tmp / "flip.pt"
    weights = torch.linspace(0, 1, 4096)
    files.save(path, {"step": 3, "w": weights})
    flip(path, path.read_bytes().find(weights[2000:2004].numpy().tobytes()) + 1)
    try:
        files.load(path)
        return "silent"
    except ValueError:
        return "clean"


def flipped_model(root: Path, tmp: Path) -> str:
    shutil.copytree(root / "model", tmp / "fmodel")
    file = tmp / "fmodel" / "model.safetensors"
    flip(file, len(file.read_bytes()) - 3)
    code, err = cli(["generate", "--model", tmp / "fmodel", "--out", tmp / "fg", "--num", "1"])
    return "silent" if code == 0 else classify(code, err)


def store_probes(root: Path, tmp: Path) -> dict[str, str]:
    from hkd import trajectories

    outcomes = {}
    copy = tmp / "times"
    shutil.copytree(root / "store", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "times": [t * 1.01 for t in manifest["times"]]}))
    outcomes["manifest times altered (--verify)"] = "silent" if not trajectories.verify_store(copy) else "clean"

    copy = tmp / "flipped"
    shutil.copytree(root / "store", copy)
    flip(copy / "shard_00001.npy", len((copy / "shard_00001.npy").read_bytes()) - 1)
    try:
        trajectories.TrajectoryDataset(copy)
        outcomes["flipped shard byte (training opens the store)"] = "silent"
    except ValueError:
        outcomes["flipped shard byte (training opens the store)"] = "clean"

    copy = tmp / "escape" / "store"
    shutil.copytree(root / "store", copy)
    (tmp / "escape" / "outside").mkdir()
    shutil.copy(copy / "shard_00000.npy", tmp / "escape" / "outside" / "x.npy")
    entry = manifest["shards"]["shard_00000.npy"]
    manifest["shards"] = {"../outside/x.npy": entry, "shard_00001.npy": manifest["shards"]["shard_00001.npy"]}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    try:
        dataset = trajectories.TrajectoryDataset(copy)
        dataset[0]
        outcomes["manifest shard name ../outside/x.npy (training)"] = "silent"
    except ValueError:
        outcomes["manifest shard name ../outside/x.npy (training)"] = "clean"
    return outcomes


def stale_temporaries(root: Path, tmp: Path) -> str:
    run = tmp / "stale"
    code, _ = cli(train_args(root, run))
    assert code == 0, code
    script = (
        "import os, signal, torch, sys\nfrom hkd import files\n"
        "def die(obj, file, *a, **k): file.write(b'partial'); file.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = die\n"
        f"files.save({str(run / 'checkpoint.pt')!r}, {{'step': 1}})\n"
    )
    subprocess.run([sys.executable, "-c", script], env={**os.environ}, check=False)
    left = list(run.glob(".*tmp"))
    cli([*train_args(root, run, "train.max_steps=2"), "--resume"])
    after = list(run.glob(".*tmp"))
    return "no temporary left by the kill" if not left else ("ok" if not after else "stale temporary kept")


def umask_probe(root: Path, tmp: Path) -> str:
    previous = os.umask(0o022)
    try:
        cli(["generate", "--model", root / "model", "--out", tmp / "um", "--num", "1"])
    finally:
        os.umask(previous)
    mode = (tmp / "um" / "grid.png").stat().st_mode & 0o777
    return "ok" if mode == 0o644 else f"mode {mode:o} under umask 022"


def sigterm_and_lock(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = ["train-teacher", "--out", str(tmp / "sig"), "--device", "cpu", *TINY, "teacher.steps=100000"]
    process = subprocess.Popen([sys.executable, "-m", "hkd.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    process.stdout.readline()
    second = subprocess.run([sys.executable, "-m", "hkd.cli", *args, "teacher.steps=2"], capture_output=True,
                            text=True, env=env, timeout=600)  # fmt: skip
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=300)
    lock = "clean" if second.returncode == 2 and "Traceback" not in second.stderr else "accepted"
    rc = process.returncode
    return {
        "second run into the same folder": lock,
        "SIGTERM during training: exit code": "ok" if rc == 128 + signal.SIGTERM else f"exit {rc}",
    }


def orphan_workers(tmp: Path) -> str:
    script = (
        "import time, torch\nfrom hkd.trajectories import TrajectoryConfig, write_store\n"
        "class Slow(torch.nn.Module):\n"
        "    img_channels, img_resolution, identity = 1, 4, {'source': 'probe', 'config': {}, 'hash': '0'}\n"
        "    def forward(self, x, sigma):\n        time.sleep(0.5)\n        return x\n"
        "cfg = TrajectoryConfig(num_trajectories=40, num_steps=50, shard_size=2, batch_size=2)\n"
        f"write_store(Slow(), {str(tmp / 'orphans')!r}, cfg, workers=2, progress=False)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    children: list[int] = []
    deadline = time.monotonic() + 120
    while len(children) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == parent.pid]
    parent.kill()
    parent.wait()
    time.sleep(5)
    alive = [c for c in children if _alive(c)]
    for c in alive:
        os.kill(c, signal.SIGKILL)
    return "ok" if not alive else f"{len(alive)} workers outlived kill -9 of the parent"


def _ppid(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def config_probes(root: Path, tmp: Path) -> dict[str, str]:
    from hkd import config

    outcomes = {}
    try:
        lr = config.load("digits", ["train.lr=1e-4"]).train.lr
        outcomes["train.lr=1e-4 is a number"] = "ok" if isinstance(lr, float) else "silent"
    except Exception:  # noqa: BLE001
        outcomes["train.lr=1e-4 is a number"] = "traceback"
    code, _ = cli(train_args(root, tmp / "resume"))
    code, err = cli([*train_args(root, tmp / "resume", "train.lr=0.5", "train.max_steps=2"), "--resume"])
    outcomes["--resume with a changed train.lr"] = "accepted" if code == 0 else classify(code, err)
    return outcomes


# ---------------------------------------------------------------------------------------------------------------
# Untrusted files: bounded cost, no file replaced that hkd did not write, no silent NaN


BOUND_MIB = 64  # peak memory a refused file may add, beyond 4x its size
TIMEOUT = 120  # seconds before a fresh process counts as a hang (--timeout: raise it on a loaded machine)
PEAKS: list[int] = []  # each bounded probe's peak memory above the baseline, MiB


# Runs ARGV as its own child and records its peak memory: a process forked from this (large) one would inherit its
# high-water mark; one forked from this small launcher starts from the launcher's.
LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[1], 'w').write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}')\n"
)


def child(argv: list, timeout: int = 180) -> tuple:
    """(exit code or 'hang', stderr, peak resident MiB) of a fresh process running ARGV (python -c or hkd)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryFile() as err:  # a file: never a full pipe
        result = Path(folder) / "result"
        command = [sys.executable, "-c", LAUNCHER, result, *argv]
        process = subprocess.Popen([str(a) for a in command], stdout=subprocess.DEVNULL, stderr=err, env=env,
                                   start_new_session=True)  # fmt: skip
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher's session: it and the command
            process.wait()
            return "hang", "", 0
        err.seek(0)
        text = err.read(1 << 20).decode(errors="replace")
        code, peak = (int(x) for x in result.read_text().split())
    return code, text, peak // 1024


def bounded(argv: list, size: int, baseline: int, timeout: int = 180) -> str:
    """The outcome of a command on a crafted file of `size` bytes: hang, unbounded (peak memory beyond the bound),
    or classify()'s."""
    code, err, peak = child(argv, timeout)
    PEAKS.append(peak - baseline)
    if code == "hang":
        return "hang"
    if peak - baseline > BOUND_MIB + 4 * size / 2**20:
        return f"unbounded (+{peak - baseline} MiB)"
    if code == 1 and "Traceback" in err:
        return "traceback"
    return classify(code, err)


def deflate_bomb(torch_file: bytes, size: int = 256 << 20) -> bytes:
    """A torch.save zip whose first data record is `size` zero bytes, deflated (about size / 1000 on disk)."""
    import zipfile

    source, out = zipfile.ZipFile(io.BytesIO(torch_file)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bomb:
        for info in source.infolist():
            bomb.writestr(info.filename, bytes(size) if info.filename.endswith("data/0") else source.read(info))
    return out.getvalue()


def torch_npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class _Storage:
    def __init__(self, blob):
        self.blob = blob

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.blob,))


class _FakeInception(torch.nn.Module):
    """A cheap stand-in for the FID network (a fixed projection of the pixels to 2048 features)."""

    features = 2048

    def __init__(self, pixels: int):
        super().__init__()
        self.projection = torch.randn(pixels, 2048, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def forward(self, images):
        return images.flatten(1).double() @ self.projection


def imported_teacher(tmp: Path) -> Path:
    from helpers import edm_format

    tmp.mkdir(parents=True, exist_ok=True)
    edm_format.write_snapshot(tmp / "edm.pkl", edm_format.songunet(img_resolution=16, model_channels=8))
    code, _ = cli(["import-teacher", tmp / "edm.pkl", "--out", tmp / "imported"])
    assert code == 0, code
    return tmp / "imported"


def edited_folder(source: Path, target: Path, edit) -> Path:
    """A copy of a model or teacher folder whose config.json text is changed by `edit` (str -> str)."""
    shutil.copytree(source, target)
    (target / "config.json").write_text(edit((target / "config.json").read_text()))
    return target


def bounded_cost_probes(root: Path, tmp: Path) -> dict[str, str]:
    """Tiny crafted files with huge declared sizes, each read by the command that takes it, in a fresh process:
    peak memory, time (a hang past the timeout) and how it ends."""
    import pickle
    import struct

    hkd_cli = [sys.executable, "-m", "hkd.cli"]
    baseline = child([*hkd_cli, "generate", "--model", tmp / "none", "--out", tmp / "none"])[2]
    teacher = imported_teacher(tmp / "b")
    zeros = io.BytesIO()
    torch.save({"format": "hkd-teacher", "w": torch.zeros(4)}, zeros)
    files = {}
    files["bomb.pkl"] = pickle.dumps({"ema": _Storage(deflate_bomb(zeros.getvalue()))})
    files["tiny.pkl"] = b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc"
    files["teacher.pt"] = deflate_bomb(zeros.getvalue())
    files["inception.pth"] = deflate_bomb(zeros.getvalue())
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (8192, 4096)})
    import zipfile

    with zipfile.ZipFile(tmp / "ref.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mu.npy", torch_npy(np.zeros(8192)))  # a valid mu: the reader gets to sigma
        archive.writestr("sigma.npy", header.getvalue() + bytes(8192 * 4096 * 8))
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    bomb += "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    files["bomb.yaml"] = bomb.encode()
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    (tmp / "store").mkdir()
    (tmp / "store" / "manifest.json").write_text(json.dumps({**manifest, "num_shards": 10**9}))
    model = edited_folder(
        root / "model", tmp / "blocks_model", lambda t: t.replace('"num_blocks": 1', '"num_blocks": 1000000')
    )
    blocks = edited_folder(
        teacher, tmp / "blocks_teacher", lambda t: t.replace('"num_blocks": 1', '"num_blocks": 1000000')
    )
    big = edited_folder(
        teacher, tmp / "big_teacher", lambda t: t.replace('"model_channels": 8', '"model_channels": 2048')
    )
    size = {name: (tmp / name).stat().st_size for name in [*files, "ref.npz"]}
    out = tmp / "bounded_out"
    h, py = hkd_cli, [sys.executable, "-c"]
    load_stats = (  # as `hkd eval --reference` calls it: a ValueError is one line, exit code 2
        "import sys\nfrom hkd import metrics\n"
        f"try:\n    metrics.load_stats({str(tmp / 'ref.npz')!r})\n"
        "except ValueError as error:\n    print(f'hkd eval: error: {error}', file=sys.stderr)\n    sys.exit(2)\n"
    )
    weights = ["--inception-weights", tmp / "inception.pth"]
    lr = "teacher.lr={" + bomb.replace("\n", ", ") + "}"
    probes = {
        "EDM pickle, deflated storage record (import-teacher)": (
            [*h, "import-teacher", tmp / "bomb.pkl", "--out", out], "bomb.pkl"),
        "EDM pickle, 2^40 bytes length in 14 bytes (import-teacher)": (
            [*h, "import-teacher", tmp / "tiny.pkl", "--out", out], "tiny.pkl"),
        "--teacher X.pt with a deflated record (trajectories)": (
            [*h, "trajectories", "--teacher", tmp / "teacher.pt", "--out", out], "teacher.pt"),
        "--inception-weights with a deflated record (fid-ref)": (
            [*h, "fid-ref", "digits", "--out", tmp / "r.npz", *weights], "inception.pth"),
        "deflated reference .npz (load_stats)": ([*py, load_stats], "ref.npz"),
        "YAML alias bomb in a config file (train-teacher)": (
            [*h, "train-teacher", "--config", tmp / "bomb.yaml", "--out", out], "bomb.yaml"),
        "YAML alias bomb in one override (train-teacher)": ([*h, "train-teacher", "--out", out, lr], "bomb.yaml"),
        "num_blocks 1000000 in a model's config.json (generate)": (
            [*h, "generate", "--model", model, "--out", out], None),
        "num_blocks 1000000 in an imported teacher's config.json (trajectories)": (
            [*h, "trajectories", "--teacher", blocks, "--out", out], None),
        "manifest num_shards 1e9 (trajectories --verify)": ([*h, "trajectories", "--verify", tmp / "store"], None),
        "imported teacher config declaring 2048 channels over small weights (trajectories)": (
            [*h, "trajectories", "--teacher", big, "--out", out], None),
    }  # fmt: skip
    outcomes = {}
    for name, (argv, file) in probes.items():
        outcomes[name] = bounded(argv, size.get(file, 1 << 20), baseline, timeout=TIMEOUT)
        print(f"peak +{PEAKS[-1]} MiB over {baseline} MiB, file {size.get(file, 0)} bytes: {name}", flush=True)
    return outcomes


def _unchanged(folder: Path, before: dict) -> bool:
    """Every file that was in `folder` is still there with the same bytes (new files are not a loss)."""
    return all((folder / name).is_file() and (folder / name).read_bytes() == data for name, data in before.items())


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def no_data_lost_probes(root: Path, tmp: Path) -> dict[str, str]:
    """Each writing command pointed at a file or folder hkd did not write: data loss if it is replaced."""
    from hkd import metrics

    teacher = imported_teacher(tmp / "d")
    pkl, outcomes = tmp / "d" / "edm.pkl", {}

    def probe(name, argv, folder):
        before = _snapshot(folder)
        code, err = cli(argv)
        outcomes[name] = classify(code, err) if _unchanged(folder, before) else "data loss"

    model = tmp / "d_model"
    shutil.copytree(root / "model", model)
    probe("import-teacher --out over a trained HKD model folder", ["import-teacher", pkl, "--out", model], model)
    user = tmp / "d_user"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    probe("import-teacher --out over a user's config.json", ["import-teacher", pkl, "--out", user], user)
    reports = tmp / "d_reports"
    reports.mkdir()
    (reports / "report.md").write_text("# a report")
    export = ["export", "--model", root / "model", "--format", "pt2", "--out"]
    probe("export --out over a user's Markdown file", [*export, reports / "report.md"], reports)
    (reports / ".tmp-model.pt2").write_text("a user's file")
    code, err = cli([*export, reports / "model.pt2"])
    kept = (reports / ".tmp-model.pt2").is_file() and (reports / ".tmp-model.pt2").read_text() == "a user's file"
    outcomes["export beside a user's .tmp-NAME"] = classify(code, err) if kept else "data loss"
    if code == 0:
        outcomes["export beside a user's .tmp-NAME"] = "ok" if kept else "data loss"
    outcomes["export --out an existing folder"] = classify(*cli([*export, reports]))
    store = tmp / "d_store"
    store.mkdir()
    (store / "shard_00000.npy").write_bytes(b"a user's array")
    argv = [
        "trajectories",
        "--teacher",
        teacher,
        "--out",
        store,
        "--device",
        "cpu",
        "--quiet",
        "trajectories.num_steps=2",
    ]
    probe(
        "trajectories --out over a folder with a user's shard_00000.npy",
        [*argv, "trajectories.num_trajectories=2"],
        store,
    )
    refs = tmp / "d_refs"
    refs.mkdir()
    np.savez(refs / "users.npz", mu=np.zeros(3), sigma=np.eye(3))
    (tmp / "weights.pth").write_bytes(b"")
    real = metrics._inception
    metrics._inception = lambda path: _FakeInception(3 * 16 * 16)
    try:
        argv = [
            "fid-ref",
            "digits",
            "--resolution",
            "16",
            "--channels",
            "3",
            "--inception-weights",
            tmp / "weights.pth",
        ]
        probe("fid-ref --out over a user's .npz", [*argv, "--out", refs / "users.npz"], refs)
    finally:
        metrics._inception = real
    return outcomes


def silent_nan_probes(root: Path, tmp: Path) -> dict[str, str]:
    """Non-finite values in configs and reference statistics: silent when the command does its work anyway."""
    import hkd.evaluation
    from hkd import metrics, trajectories

    teacher = imported_teacher(tmp / "n")
    outcomes = {}
    model = edited_folder(
        root / "model", tmp / "n_model", lambda t: t.replace('"sigma_max": 80.0', '"sigma_max": Infinity')
    )
    code, err = cli(["generate", "--model", model, "--out", tmp / "n_gen", "--num", "2"])
    outcomes["sigma_max: Infinity in config.json (generate)"] = "silent" if code == 0 else classify(code, err)
    code, err = cli(["export", "--model", model, "--format", "pt2", "--out", tmp / "n.pt2"])
    outcomes["sigma_max: Infinity in config.json (export)"] = "silent" if code == 0 else classify(code, err)
    store_args = ["--device", "cpu", "--quiet", "trajectories.num_trajectories=2", "trajectories.num_steps=2"]
    code, err = cli(
        ["trajectories", "--teacher", teacher, "--out", tmp / "n_s1", *store_args, "trajectories.sigma_max=.inf"]
    )
    outcomes["trajectories.sigma_max=.inf"] = "silent" if code == 0 else classify(code, err)
    nan_teacher = edited_folder(
        teacher, tmp / "n_teacher", lambda t: t.replace('"sigma_data": 0.5', '"sigma_data": Infinity')
    )
    code, err = cli(["trajectories", "--teacher", nan_teacher, "--out", tmp / "n_s2", *store_args])
    outcomes["sigma_data: Infinity in an imported teacher (trajectories)"] = (
        "silent" if code == 0 else classify(code, err)
    )

    class NaNTeacher(torch.nn.Module):
        img_channels, img_resolution, identity = 1, 4, {"source": "probe", "config": {}, "hash": "0"}

        def forward(self, x, sigma):
            return x * float("nan")

    cfg = trajectories.TrajectoryConfig(num_trajectories=2, num_steps=2, shard_size=2)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            manifest = trajectories.write_store(NaNTeacher(), tmp / "n_s3", cfg, progress=False)
        outcome = "silent" if manifest["shards"] else "ok"
    except Exception as error:  # noqa: BLE001
        from hkd.errors import UserError

        outcome = "clean" if isinstance(error, UserError) else "traceback"
    outcomes["a teacher giving NaN: shard marked finished"] = outcome

    d = 2048
    a = np.random.default_rng(0).standard_normal((d, 64))
    good = a @ a.T / 64
    bad = {
        "NaN in sigma": (np.zeros(d), np.where(np.eye(d) > 0, np.nan, good)),
        "inf in mu": (np.full(d, np.inf), good),
        "non-symmetric sigma": (np.zeros(d), good + np.triu(np.ones((d, d)), 1)),
        "non-PSD sigma": (np.zeros(d), good - 10 * np.eye(d)),
        "wrong feature count (64)": (np.zeros(64), good[:64, :64]),
        "complex arrays": (np.zeros(d, complex), good.astype(complex)),
        "string arrays": (np.array(["a"] * d), good),
        "bool arrays": (np.zeros(d, bool), good > 0),
    }
    (tmp / "weights.pth").write_bytes(b"")
    real = metrics._inception, hkd.evaluation.teacher_samples
    metrics._inception = lambda path: _FakeInception(1 * 8 * 8)

    def sampling(*args, **kwargs):
        raise WorkStarted

    hkd.evaluation.teacher_samples = sampling
    try:
        for name, (mu, sigma) in bad.items():
            np.savez(tmp / "n_ref.npz", mu=mu, sigma=sigma)
            argv = ["eval", "--model", root / "model", "--teacher", root / "teacher", "--num", "2", "--device", "cpu"]
            argv += ["--reference", tmp / "n_ref.npz", "--inception-weights", tmp / "weights.pth", "--out", tmp / "n_e"]
            outcomes[f"reference .npz: {name} (eval, before sampling)"] = classify(*cli(argv))
    finally:
        metrics._inception, hkd.evaluation.teacher_samples = real
    return outcomes


def file_probes(root: Path, tmp: Path) -> dict[str, str]:
    outcomes = bounded_cost_probes(root, tmp)
    outcomes |= no_data_lost_probes(root, tmp)
    return outcomes | silent_nan_probes(root, tmp)


# The explorer's server (hkd explore), over raw sockets to 127.0.0.1


def _http(port: int, head: str | None, body: bytes = b"", wait: float = 45.0, reset: bool = False, end=False):
    """(status, JSON body or None) of one raw request; None: closed without an answer; "hang": no answer in `wait` s.
    head None: send nothing. reset=True: the client closes with a reset right after sending (it leaves before the
    answer). end=True: the client shuts its side after sending (the end of a body without a length)."""
    import socket
    import struct

    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        try:
            if head is not None:
                s.sendall(head.replace("PORT", str(port)).encode("utf-8") + b"\r\n\r\n" + body)
            if end:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server refused before reading everything: its answer is still there
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return None
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except TimeoutError:
            return "hang"
        except OSError:
            pass
    if not data:
        return None
    head, _, answer = data.partition(b"\r\n\r\n")
    try:
        return int(head.split()[1]), json.loads(answer) if b"application/json" in head else None
    except (IndexError, ValueError):
        return None


def _served(result, refusal: str = "clean") -> str:
    """refusal (a 4xx answer with a one-line JSON error), accepted (200), hang, or what else came back."""
    if result == "hang":
        return "hang"
    if result is None:
        return "closed without an answer"
    status, answer = result
    if 400 <= status < 500:
        one_line = isinstance(answer, dict) and "\n" not in str(answer.get("error", "\n"))
        return refusal if one_line else f"{status} without a one-line error"
    return "accepted" if status == 200 else f"status {status}"


def explore_probes(tmp: Path) -> dict[str, str]:
    """`hkd explore`'s server: who may drive it, bodies, client timeouts and disconnects, strict values."""
    import threading

    from hkd import explore
    from hkd.model import HKDModel, ModelConfig

    torch.manual_seed(0)
    model = HKDModel(ModelConfig(img_resolution=8, img_channels=1, model_channels=4, channel_mult=(1,))).eval()
    x = explore.Explorer(model)
    server = explore.make_server(x, "127.0.0.1", 0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = "Host: 127.0.0.1:PORT"
    edit = {"seed": 0, "t": 2.0, "box": [0, 0, 8, 8], "band": "high", "r": 0.5, "reference": {"seed": 1}}

    def post(body: bytes, *headers: str, path: str = "/api/edit"):
        return _http(port, "\r\n".join([f"POST {path} HTTP/1.1", host, f"Content-Length: {len(body)}", *headers]), body)

    def edit_with(**fields):
        before = len(x.edits)
        outcome = _served(post(json.dumps({**edit, **fields}).encode()))
        return "accepted" if len(x.edits) > before else outcome

    outcomes = {}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        get = lambda path, *headers: _http(port, "\r\n".join([f"GET {path} HTTP/1.1", *headers]))
        outcomes["explore: Host attacker.example (DNS rebinding) reads /api/info"] = _served(
            get("/api/info", "Host: attacker.example:PORT"), "ok"
        )
        before = len(x.edits)
        cross = post(json.dumps(edit).encode(), "Origin: http://attacker.example", "Content-Type: text/plain")
        outcomes["explore: cross-origin text/plain POST /api/edit"] = (
            "accepted" if len(x.edits) > before else _served(cross, "ok")
        )
        cross_site = get("/api/frame.png?seed=0&t=1", host, "Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: no-cors")
        outcomes["explore: Sec-Fetch-Site cross-site GET /api/frame.png"] = _served(cross_site, "ok")
        big = b"\x00" * (explore.MAX_UPLOAD_BYTES + 2**20)
        result = _http(port, f"POST /api/upload HTTP/1.1\r\n{host}\r\nContent-Length: -1", big, end=True)
        capped = result not in (None, "hang") and "Content-Length" in str(result[1])  # refused before reading it
        outcomes["explore: Content-Length -1 with an 11 MiB upload"] = (
            "clean" if capped else _served(result, "accepted")
        )
        png = io.BytesIO()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, format="PNG")
        arabic = str(len(png.getvalue())).translate(
            str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")
        )
        outcomes["explore: Content-Length in Arabic-Indic digits (a PNG upload)"] = _served(
            _http(port, f"POST /api/upload HTTP/1.1\r\n{host}\r\nContent-Length: {arabic}", png.getvalue())
        )
        outcomes["explore: Content-Length 1000, 10 bytes sent"] = _served(
            _http(port, f"POST /api/upload HTTP/1.1\r\n{host}\r\nContent-Length: 1000", b"0123456789"), "ok"
        )
        outcomes["explore: a client that connects and sends nothing"] = (
            "hang" if _http(port, None, wait=45.0) == "hang" else "ok"
        )
        for name, fields in [
            ('"t": true', {"t": True}),
            ('"seed": 3.9', {"seed": 3.9}),
            ('"box": "0088" (a string)', {"box": "0088"}),
            ('"box": {"0": 0, "1": 0, "7": 0, "8": 0} (a dict)', {"box": {"0": 0, "1": 0, "7": 0, "8": 0}}),
        ]:
            outcomes[f"explore: /api/edit with {name}"] = edit_with(**fields)
        for name, query in [
            ("an Arabic-Indic level number in off", "seed=0&t=1&off=%D9%A0-low"),
            ("an Arabic-Indic seed", "seed=%D9%A3&t=1"),
            ("an Arabic-Indic t", "seed=0&t=%D9%A1.5"),
        ]:
            outcomes[f"explore: GET /api/frame.png with {name}"] = _served(get(f"/api/frame.png?{query}", host))

        real, left = x.frame, threading.Event()

        def slow(*args, **kwargs):
            left.wait(30)
            time.sleep(0.5)
            return real(*args, **kwargs)

        x.frame = slow
        before = err.tell()
        _http(port, f"GET /api/frame.png?seed=0&t=1&scale=32 HTTP/1.1\r\n{host}", reset=True)
        left.set()
        time.sleep(5)
        x.frame = real
        printed = err.getvalue()[before:]
        lines = printed.strip().splitlines()
        outcomes["explore: a client that leaves before the answer"] = (
            "traceback" if "Traceback" in printed else ("ok" if len(lines) <= 1 else f"{len(lines)} lines")
        )
    server.shutdown()
    server.server_close()
    if "Traceback" in err.getvalue():
        outcomes["explore: the server's console"] = "traceback"
    return outcomes


# The leftovers of the second round: NaN with several trajectory workers, --out made before the inputs are read,
# and the number of explorer connections

NAN_CLI = (  # hkd's CLI in a fresh process, with a teacher that gives NaN (the workers' stderr is the process's)
    "import sys, torch, hkd.teacher\nfrom hkd.cli import main\n"
    "class NaNTeacher(torch.nn.Module):\n"
    "    img_channels, img_resolution, identity = 1, 4, {'source': 'probe', 'config': {}, 'hash': '0'}\n"
    "    def forward(self, x, sigma):\n        return x * float('nan')\n"
    "hkd.teacher.load_teacher = lambda path, device: NaNTeacher()\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def leftover_probes(root: Path, tmp: Path) -> dict[str, str]:
    outcomes = {}
    for workers in (1, 2):
        store = tmp / f"l_nan{workers}"
        argv = [sys.executable, "-c", NAN_CLI, "trajectories", "--teacher", tmp / "unused", "--out", store]
        argv += ["--device", "cpu", "--quiet", "--workers", workers, "trajectories.num_trajectories=4"]
        code, err, _ = child([*argv, "trajectories.shard_size=2", "trajectories.num_steps=2"], TIMEOUT)
        manifest = store / "manifest.json"
        finished = manifest.is_file() and json.loads(manifest.read_text())["shards"]
        outcome = "hang" if code == "hang" else "traceback" if "Traceback" in err else classify(code, err)
        outcomes[f"a teacher giving NaN, --workers {workers} (trajectories, CLI)"] = (
            "silent" if finished or code == 0 else outcome
        )
    wrong = edited_folder(
        root / "model", tmp / "l_wrong", lambda t: t.replace('"num_blocks": 1', '"num_blocks": 1000000')
    )
    commands = {
        "generate, a refused model": ["generate", "--model", wrong],
        "generate, a missing model": ["generate", "--model", tmp / "missing"],
        "trajectories, a refused teacher": ["trajectories", "--teacher", wrong, "--device", "cpu"],
        "trajectories --workers 2, a missing teacher": ["trajectories", "--teacher", tmp / "missing", "--workers", 2],
        "analyze, a refused model": ["analyze", "--model", wrong],
        "edit, a refused model": ["edit", "--model", wrong],
        "ablate, a refused teacher": ["ablate", "--teacher", wrong, "--device", "cpu"],
    }
    for i, (name, argv) in enumerate(commands.items()):
        out = tmp / f"l_out{i}" / "new"
        code, err = cli([*argv, "--out", out])
        outcomes[f"{name}: no --out folder made"] = "left a folder" if out.parent.exists() else classify(code, err)
    return outcomes


def connection_probes(tmp: Path, silent: int = 100) -> dict[str, str]:
    """`hkd explore` with `silent` clients that connect and say nothing: threads started, a request beside them,
    and a request after they leave."""
    import socket
    import threading

    from hkd import explore
    from hkd.model import HKDModel, ModelConfig

    torch.manual_seed(0)
    model = HKDModel(ModelConfig(img_resolution=8, img_channels=1, model_channels=4, channel_mult=(1,))).eval()
    server = explore.make_server(explore.Explorer(model), "127.0.0.1", 0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    info = f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}"
    # the silent clients keep their connections for the whole probe, however slowly a loaded machine accepts them
    timeouts = explore.Handler.timeout, explore.HEAD_DEADLINE
    explore.Handler.timeout = explore.HEAD_DEADLINE = 300
    outcomes, err = {}, io.StringIO()
    with contextlib.redirect_stderr(err):
        threads = threading.active_count()
        clients = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(silent)]
        counts, deadline = [-1, -2, -3, -4, -5], time.monotonic() + 120
        while len(set(counts[-5:])) > 1 and time.monotonic() < deadline:  # every connection accepted and handled
            time.sleep(1)
            counts.append(threading.active_count() - threads)
        result = _http(port, info, wait=45.0)
        outcomes[f"explore: {silent} silent connections (threads)"] = "unbounded" if counts[-1] > 64 else "ok"
        print(f"explore: {silent} silent connections started {counts[-1]} threads", flush=True)
        if result not in (None, "hang") and result[0] == 503:
            one_line = isinstance(result[1], dict) and "\n" not in str(result[1].get("error", "\n"))
            outcome = "ok" if one_line else "503 without a one-line error"
        else:
            outcome = _served(result)
        outcomes[f"explore: a request beside {silent} silent connections"] = outcome
        for c in clients:
            c.close()
        deadline, result = time.monotonic() + 30, None
        while time.monotonic() < deadline and (result in (None, "hang") or result[0] != 200):
            result = _http(port, info, wait=45.0)
            time.sleep(0.2)
        outcomes["explore: a request after the silent clients leave"] = "ok" if result[0] == 200 else _served(result)
    explore.Handler.timeout, explore.HEAD_DEADLINE = timeouts
    server.shutdown()
    server.server_close()
    if "Traceback" in err.getvalue():
        outcomes["explore: the server's console (connections)"] = "traceback"
    return outcomes


def main() -> None:
    global TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the outcomes as JSON here")
    parser.add_argument(
        "--only",
        choices=("files", "explore", "leftovers"),
        help="run only these probes (files: bounded cost, data loss, NaN; explore: the explorer's server; "
        "leftovers: NaN with several workers, --out made before the inputs are read, explorer connections)",
    )
    parser.add_argument("--timeout", type=int, default=TIMEOUT, help=f"hang timeout, s (default {TIMEOUT})")
    args = parser.parse_args()
    TIMEOUT = args.timeout
    torch.set_num_threads(1)
    import hkd.teacher

    outcomes: dict[str, str] = {}
    try:  # a probe that breaks still leaves the outcomes so far
        with tempfile.TemporaryDirectory() as folder:
            tmp = Path(folder)
            root = tmp / "fixtures"
            root.mkdir()
            os.chdir(tmp)
            paths = fixtures(root)
            if args.only is not None:
                probes = {
                    "files": lambda: file_probes(root, tmp),
                    "explore": lambda: explore_probes(tmp),
                    "leftovers": lambda: leftover_probes(root, tmp) | connection_probes(tmp),
                }
                outcomes |= probes[args.only]()
                return
            import hkd.bench
            import hkd.train

            def refuse(*a, **k):
                raise WorkStarted

            # the points where real work starts: a bad call must have failed before them
            patched = [(hkd.teacher, "_batches"), (hkd.train, "StoreBatches"), (hkd.train, "OnlineBatches")]
            patched += [(hkd.bench, "bench_spectral"), (hkd.bench, "bench_dense")]
            real = [getattr(module, name) for module, name in patched]
            for module, name in patched:
                setattr(module, name, refuse)
            for i, (line, fragment) in enumerate(CASES):
                if fragment is None:
                    continue
                argv = [part.format(**paths, out=str(tmp / f"out{i}"), sp=" ") for part in line.split()]
                outcomes[f"hkd {line}"] = classify(*cli(argv))
            outcomes["demo --fresh on a folder hkd did not make"] = fresh_on_a_user_folder(paths, tmp)
            for (module, name), value in zip(patched, real, strict=True):
                setattr(module, name, value)
            outcomes |= pickle_places(root, tmp)
            outcomes["a NaN/inf weight at a checkpoint step"] = nonfinite_weights(tmp)
            outcomes["flipped byte in checkpoint.pt"] = flipped_checkpoint(tmp)
            outcomes["flipped byte in model.safetensors (generate)"] = flipped_model(root, tmp)
            outcomes |= store_probes(root, tmp)
            outcomes["kill -9 during a checkpoint save, then resume"] = stale_temporaries(root, tmp)
            outcomes["file mode under umask 022"] = umask_probe(root, tmp)
            outcomes |= config_probes(root, tmp)
            outcomes |= sigterm_and_lock(tmp)
            outcomes["--workers 2, parent killed -9"] = orphan_workers(tmp)
            outcomes |= file_probes(root, tmp)
            outcomes |= leftover_probes(root, tmp)
            outcomes |= explore_probes(tmp)
            outcomes |= connection_probes(tmp)
    finally:
        os.chdir(ROOT)
        report(outcomes, args.out)


def report(outcomes: dict[str, str], out: str | None) -> None:
    for name, outcome in outcomes.items():
        print(f"{outcome:12s} {name}")
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    print(f"{len(outcomes)} probes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if out:
        Path(out).write_text(json.dumps(outcomes, indent=1))


if __name__ == "__main__":
    main()
