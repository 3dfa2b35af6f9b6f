"""PF-ODE trajectory store: the teacher's Heun trajectories, sharded, resumable, memory-mappable.

Layout of a store folder:

    manifest.json        what was made and how (below), and the finished shards with their sha256
    shard_00000.npy      trajectories [0, shard_size): array (n, S, C, H, W), S stored states per trajectory
    shard_00001.npy      ...

Trajectory i starts from x_T = sigma_max * numpy.random.default_rng([seed, i]).standard_normal((C, H, W), float32):
its noise depends on (seed, i) only, so a store is the same whatever the number of workers, ranks or runs. The
stored states are the solver's states at `state_indices` of its time grid (times = manifest["times"]); the first is
x_T (t = sigma_max), the last x_eps, the generated image (EDM's grid ends at t = 0, after the step from sigma_min).
Disk: S * C * H * W * 2 bytes per trajectory in float16 (digits 16x16, all 19 states: 9.7 kB; CIFAR-10 32x32x3:
117 kB, so 1M trajectories take 117 GB; store fewer states with `state_indices`).

Safety: a shard is written under a temporary name and renamed when complete, then recorded in the manifest (under a
file lock); a restart skips recorded shards and redoes any other. `verify_store` checks every shard (checksum,
shape, dtype, finite values) and the manifest (its times against the solver's grid, plain shard names);
`TrajectoryDataset` checks the manifest and every shard's checksum when it opens a store, so training never reads
an altered store. Local workers die with the process that started them. Shard k is
written by worker k mod (world_size * workers), so torchrun ranks and local workers write disjoint shards.

The trainer reads a store with `TrajectoryDataset` or draws fresh trajectories with `OnlineTrajectories`; both give
the same dict per trajectory: x_T, x_eps (C, H, W), x_t (num_times, C, H, W) at times t (num_times,), index.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import io
import json
import math
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hkd.edm import heun_sampler, time_steps
from hkd.errors import ConfigError, CorruptFileError, MissingFileError, NonFiniteError, UserError, brief
from hkd.files import TMP_SUFFIX, atomic_write, output_folder, read_json
from hkd.sections import Section

MANIFEST = "manifest.json"
FORMAT = "hkd-trajectories"
SHARD_NAME = re.compile(r"shard_[0-9]{5,}\.npy")
MAX_SHARDS = 100_000  # shards in a store (a manifest may declare no more: the store's loops and lists are this long)
MAX_STEPS = 10_000  # solver steps (its time grid is allocated from the manifest's number)


@dataclass(frozen=True)
class TrajectoryConfig(Section, name="trajectories"):
    """The `trajectories` section: the solver (EDM Heun), which of its states to keep, and the store's layout."""

    num_trajectories: int = 10000
    num_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    state_indices: tuple[int, ...] | None = None  # None: all of 0..num_steps; 0 and num_steps are always kept
    shard_size: int = 1000
    batch_size: int = 500
    dtype: str = "float16"
    seed: int = 0

    def check(self) -> None:
        for key in ("num_trajectories", "num_steps", "shard_size", "batch_size"):
            self.require(getattr(self, key) >= 1, key, ">= 1")
        self.require(self.num_steps <= MAX_STEPS, "num_steps", f"<= {MAX_STEPS} (hkd's limit)")
        shards = -(-self.num_trajectories // self.shard_size)
        self.require(
            shards <= MAX_SHARDS, "num_trajectories", f"at most {MAX_SHARDS} shards of shard_size (hkd's limit)"
        )
        self.require(0 < self.sigma_min < self.sigma_max, "sigma_min", f"in (0, sigma_max = {self.sigma_max})")
        self.require(self.rho > 0, "rho", "> 0")
        self.require(self.dtype in ("float16", "float32", "float64"), "dtype", "float16, float32 or float64")
        self.require(self.seed >= 0, "seed", ">= 0")
        self.indices()

    def solver(self) -> dict[str, Any]:
        return {"sampler": "heun", **{k: getattr(self, k) for k in ("num_steps", "sigma_min", "sigma_max", "rho")}}

    def indices(self) -> list[int]:
        n = self.num_steps
        chosen = range(n + 1) if self.state_indices is None else self.state_indices
        bad = [i for i in chosen if not 0 <= i <= n]
        if bad:
            raise ConfigError(f"trajectories.state_indices {bad} outside the solver's grid 0..{n}")
        return sorted(set(chosen) | {0, n})


class CorruptShardError(CorruptFileError):
    """A shard or manifest that is missing, truncated, altered or does not match; the message names it."""


def trajectory_noise(seed: int, index: int, shape: tuple[int, ...]) -> Tensor:
    """The standard normal noise of trajectory `index`: a function of (seed, index) only."""
    return torch.from_numpy(np.random.default_rng([seed, index]).standard_normal(shape, dtype=np.float32))


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.npy"


def make_spec(identity: dict[str, Any], cfg: TrajectoryConfig, state_shape: tuple[int, ...]) -> dict[str, Any]:
    """Everything that defines a store's content (the manifest without its list of finished shards)."""
    indices = cfg.indices()
    grid = time_steps(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).tolist()
    return {
        "format": FORMAT,
        "version": 1,
        "teacher": {k: identity[k] for k in ("source", "hash", "path", "config") if k in identity},
        "solver": cfg.solver(),
        "solver_times": grid,
        "state_indices": indices,
        "times": [grid[i] for i in indices],
        "state_shape": list(state_shape),
        "dtype": cfg.dtype,
        "bytes_per_trajectory": len(indices) * int(np.prod(state_shape)) * np.dtype(cfg.dtype).itemsize,
        "num_trajectories": cfg.num_trajectories,
        "shard_size": cfg.shard_size,
        "num_shards": -(-cfg.num_trajectories // cfg.shard_size),
        "seed": cfg.seed,
        "seed_range": [0, cfg.num_trajectories],
        "noise": "x_T = sigma_max * numpy.random.default_rng([seed, i]).standard_normal(state_shape, float32)",
        "batch_size": cfg.batch_size,
    }


def _content(spec: dict[str, Any]) -> dict[str, Any]:
    """What two specs must agree on to write into the same store (not where the teacher file lies, not batching)."""
    content = {k: v for k, v in spec.items() if k not in ("shards", "batch_size", "created")}
    content["teacher"] = {k: v for k, v in spec["teacher"].items() if k != "path"}
    return content


def read_manifest(store_dir: str | Path) -> dict[str, Any]:
    """The store's manifest; one that is not JSON, not a store's, or names a shard by anything but a plain
    `shard_NNNNN.npy` (a path, `..`) is a CorruptShardError naming it."""
    path = Path(store_dir) / MANIFEST
    if not path.is_file():
        raise MissingFileError(f"no trajectory store at {str(store_dir)!r} ({MANIFEST} not found)")
    try:
        manifest = read_json(path)
    except CorruptFileError as error:
        raise CorruptShardError(str(error)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptShardError(f"{path} is not a trajectory store manifest")
    shards = manifest.get("shards")
    if not isinstance(shards, dict):
        raise CorruptShardError(f"{path}: 'shards' is not a mapping of shard names")
    bad = [name for name in shards if not (isinstance(name, str) and SHARD_NAME.fullmatch(name))]
    if bad:
        raise CorruptShardError(f"{path}: shard names must be plain file names shard_NNNNN.npy, got {bad[:3]}")
    return manifest


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """What is wrong in a manifest, one line each: its times against the solver's grid (recomputed from the solver
    settings), its state indices, and each shard's name and range against its position in the store."""
    try:
        solver = manifest["solver"]
        shard_size, total, num_shards = (manifest[k] for k in ("shard_size", "num_trajectories", "num_shards"))
        sizes = (solver["num_steps"], shard_size, total, num_shards)
        if not all(isinstance(n, int) and n >= 1 for n in sizes) or solver["num_steps"] > MAX_STEPS:
            return [f"{MANIFEST}: num_steps, shard_size, num_trajectories and num_shards must be positive integers"
                    f" (num_steps at most {MAX_STEPS})"]  # fmt: skip
        if num_shards > MAX_SHARDS or num_shards != -(-total // shard_size):
            return [f"{MANIFEST}: num_shards {brief(num_shards)} does not match num_trajectories and shard_size, or "
                    f"is above hkd's limit of {MAX_SHARDS}"]  # fmt: skip
        grid = time_steps(*(solver[k] for k in ("num_steps", "sigma_min", "sigma_max", "rho"))).tolist()
        indices, times = manifest["state_indices"], manifest["times"]
    except (KeyError, TypeError, ValueError) as error:
        return [f"{MANIFEST}: incomplete or malformed ({type(error).__name__}: {brief(str(error), 100, plain=True)})"]

    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(
            math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b, strict=True)
        )

    problems = []
    if not same(manifest.get("solver_times", []), grid):
        problems.append(f"{MANIFEST}: solver_times differ from the grid of its solver settings {solver}")
    n = len(grid) - 1
    if not (all(isinstance(i, int) and 0 <= i <= n for i in indices) and indices and indices[0] == 0):
        problems.append(f"{MANIFEST}: state_indices {indices} are not indices into the solver's grid 0..{n}")
    elif not same(times, [grid[i] for i in indices]):
        problems.append(f"{MANIFEST}: times differ from the solver's grid at state_indices (altered)")
    if manifest.get("num_shards") != -(-total // max(shard_size, 1)):
        problems.append(f"{MANIFEST}: num_shards does not match num_trajectories and shard_size")
    for name, entry in manifest["shards"].items():
        entry = entry if isinstance(entry, dict) else {}
        k = int(name[len("shard_") : -len(".npy")])
        span = [k * shard_size, min(total, (k + 1) * shard_size)]
        if k >= manifest.get("num_shards", 0) or entry.get("trajectories") != span:
            problems.append(f"{name}: the manifest's trajectory range {entry.get('trajectories')} is not {span}")
    return problems


def _write_json(path: Path, value: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(value, indent=1))


@contextlib.contextmanager
def _locked(store_dir: Path):
    """An exclusive lock on the store's manifest, across processes (ranks, workers) on this file system."""
    with open(store_dir / ".lock", "a") as lock:  # never truncated: a user's file of that name keeps its bytes
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_range(spec: dict[str, Any], k: int) -> tuple[int, int]:
    return k * spec["shard_size"], min(spec["num_trajectories"], (k + 1) * spec["shard_size"])


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _write_shard(denoiser: nn.Module, store_dir: Path, spec: dict[str, Any], k: int, device, advance) -> None:
    """Solve shard k's trajectories batch by batch, save under a temporary name, rename, record in the manifest."""
    start, stop = _shard_range(spec, k)
    shape, indices, solver = tuple(spec["state_shape"]), spec["state_indices"], spec["solver"]
    out = np.empty((stop - start, len(indices), *shape), dtype=spec["dtype"])
    for a in range(start, stop, spec["batch_size"]):
        b = min(stop, a + spec["batch_size"])
        noise = torch.stack([trajectory_noise(spec["seed"], i, shape) for i in range(a, b)]).to(device)
        _, states = heun_sampler(
            denoiser, noise, *(solver[key] for key in ("num_steps", "sigma_min", "sigma_max", "rho"))
        )
        out[a - start : b - start] = states[indices].transpose(0, 1).cpu().numpy().astype(spec["dtype"])
        advance(b - a)
    name = shard_name(k)
    if not np.isfinite(out).all():  # never recorded as finished: the teacher or the solver settings are broken
        raise NonFiniteError(
            f"{store_dir / name}: the teacher's trajectories hold NaN or inf values (in {spec['dtype']}); nothing "
            "written for this shard; check the teacher and the trajectories section"
        )
    buffer = io.BytesIO()
    np.save(buffer, out)
    digest = hashlib.sha256(buffer.getbuffer()).hexdigest()
    atomic_write(store_dir / name, buffer.getbuffer())
    with _locked(store_dir):
        manifest = read_manifest(store_dir)
        manifest["shards"][name] = {"trajectories": [start, stop], "sha256": digest}
        _write_json(store_dir / MANIFEST, manifest)


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this worker process when its parent dies, even by kill -9."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _run_worker(denoiser, store_dir, spec, shards, device, threads, counter, parent=None, reasons=None) -> None:
    """Write `shards`. A forked worker (parent set) sends a UserError to the parent through `reasons` and exits
    with code 2, so the parent reports it as one line; any other exception is a bug and keeps its traceback."""
    if parent is not None:
        _die_with_parent(parent)
    if threads:
        torch.set_num_threads(threads)

    def advance(n):
        with counter.get_lock():
            counter.value += n

    try:
        for k in shards:
            _write_shard(denoiser, store_dir, spec, k, device, advance)
    except UserError as error:
        if reasons is None:
            raise
        reasons.put((type(error), str(error)))
        os._exit(2)  # no traceback: the parent raises the error


def write_store(
    denoiser: nn.Module,
    store_dir: str | Path,
    cfg: TrajectoryConfig,
    *,
    workers: int = 1,
    device: str | torch.device = "cpu",
    max_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or complete) the store of `denoiser`'s trajectories (a teacher from `hkd.teacher.load_teacher`, with
    .identity, .img_channels, .img_resolution). Returns the manifest.

    Under torchrun (RANK, WORLD_SIZE set) each rank writes its own shards: shard k goes to global worker
    k mod (WORLD_SIZE * workers). `workers` > 1 forks local processes (CPU), each with its share of the threads.
    `max_shards` stops after that many new shards per worker (for time-limited jobs); run again to continue.
    A store made with another teacher or other settings is refused; unfinished shards are (re)done.
    """
    if workers > 1 and torch.device(device).type != "cpu":
        raise UserError("local workers run on the CPU; for several GPUs start one process per GPU with torchrun")
    store_dir = output_folder(store_dir, "trajectory store")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    spec = make_spec(denoiser.identity, cfg, shape)
    with _locked(store_dir):
        for tmp in store_dir.glob(f".{MANIFEST}.*{TMP_SUFFIX}"):  # a writer killed while it held the lock
            tmp.unlink()
        if (store_dir / MANIFEST).exists():
            manifest = read_manifest(store_dir)
            old, new = _content(manifest), _content(spec)
            diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if diff:
                raise ConfigError(
                    f"{store_dir} holds another store (its {', '.join(diff)} differ{'s' if len(diff) == 1 else ''}"
                    " from this teacher and config); write to a new folder"
                )
        else:
            foreign = [p.name for p in store_dir.iterdir() if SHARD_NAME.fullmatch(p.name)][:3]
            if foreign:
                raise UserError(
                    f"{store_dir} holds {', '.join(foreign)} but no {MANIFEST}: not a store hkd wrote, and its files "
                    "would be replaced; write to a new folder"
                )
            manifest = {**spec, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shards": {}}
            _write_json(store_dir / MANIFEST, manifest)
    finished = {name for name in manifest["shards"] if (store_dir / name).is_file()}
    total_workers = world * workers
    mine = [
        [
            k
            for k in range(spec["num_shards"])
            if k % total_workers == rank * workers + j and shard_name(k) not in finished
        ]
        for j in range(workers)
    ]
    mine = [shards[:max_shards] if max_shards is not None else shards for shards in mine]
    for shards in mine:  # leftovers of interrupted runs on the shards about to be redone
        for k in shards:
            for tmp in store_dir.glob(f".{shard_name(k)}.*.tmp"):
                tmp.unlink(missing_ok=True)
    todo = sum(_shard_range(spec, k)[1] - _shard_range(spec, k)[0] for shards in mine for k in shards)

    from tqdm import tqdm

    ctx = torch.multiprocessing.get_context("fork")
    counter = ctx.Value("q", 0)
    with tqdm(total=todo, unit="traj", desc=f"trajectories (rank {rank})", disable=not progress) as bar:
        if workers == 1:
            _run_worker(denoiser, store_dir, spec, mine[0], device, 0, counter)
        else:
            threads = max(1, torch.get_num_threads() // workers)
            reasons = ctx.SimpleQueue()
            args = [(denoiser, store_dir, spec, s, device, threads, counter, os.getpid(), reasons) for s in mine]
            processes = [ctx.Process(target=_run_worker, args=a, daemon=True) for a in args]
            for p in processes:
                p.start()
            while any(p.is_alive() for p in processes) and reasons.empty():
                time.sleep(0.2)
                bar.update(counter.value - bar.n)
            if not reasons.empty():  # a worker's UserError (a non-finite shard): the others would meet it too
                kind, message = reasons.get()
                for p in processes:
                    p.kill()  # finished shards stay recorded; a half-written one is only a temporary file
                for p in processes:
                    p.join()
                raise kind(message)
            failed = [j for j, p in enumerate(processes) if p.exitcode != 0]
            if failed:
                raise RuntimeError(
                    f"trajectory worker(s) {failed} failed (see their traceback above); run again to resume"
                )
        bar.update(counter.value - bar.n)
    return read_manifest(store_dir)


# ---------------------------------------------------------------------------------------------------------------
# Checking


def _open_shard(store_dir: Path, manifest: dict[str, Any], name: str) -> np.ndarray:
    """A finished shard, memory-mapped, checked against the manifest's shape and dtype."""
    path = store_dir / name
    start, stop = manifest["shards"][name]["trajectories"]
    expected = (stop - start, len(manifest["state_indices"]), *manifest["state_shape"])
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:
        raise CorruptShardError(f"shard {path} is missing, truncated or corrupt ({error})") from error
    if array.shape != expected or array.dtype != np.dtype(manifest["dtype"]):
        raise CorruptShardError(
            f"shard {path} holds {array.dtype}{list(array.shape)}, "
            f"the manifest says {manifest['dtype']}{list(expected)}"
        )
    return array


def verify_store(store_dir: str | Path) -> list[str]:
    """Check every shard of the store against the manifest (present, recorded, checksum, shape, dtype, finite).
    Returns the problems, one line each, naming the shard; empty when the store is complete and intact."""
    store_dir = Path(store_dir)
    manifest = read_manifest(store_dir)
    problems = manifest_problems(manifest)
    num_shards = manifest.get("num_shards")
    if not isinstance(num_shards, int) or not 0 <= num_shards <= MAX_SHARDS:
        return problems
    for k in range(manifest["num_shards"]):
        name = shard_name(k)
        entry = manifest["shards"].get(name)
        if entry is None:
            problems.append(f"{name}: not finished (run `hkd trajectories` again to complete the store)")
            continue
        try:
            array = _open_shard(store_dir, manifest, name)
        except CorruptShardError as error:
            problems.append(f"{name}: {error}")
            continue
        if _sha256(store_dir / name) != entry["sha256"]:
            problems.append(f"{name}: checksum differs from the manifest's (modified or corrupt)")
        elif not all(np.isfinite(array[i : i + 256]).all() for i in range(0, len(array), 256)):
            problems.append(f"{name}: non-finite values")
    return problems


def _check_shards(store_dir: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """Every named shard opens with the manifest's shape and dtype and has its recorded checksum (one read of the
    store, a few threads), or a CorruptShardError naming the first bad one."""

    def check(name: str) -> str | None:
        try:
            _open_shard(store_dir, manifest, name)
        except CorruptShardError as error:
            return str(error)
        if _sha256(store_dir / name) != manifest["shards"][name].get("sha256"):
            return f"shard {store_dir / name}: checksum differs from the manifest's (modified or corrupt)"
        return None

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        problems = [p for p in pool.map(check, names) if p]
    if problems:
        raise CorruptShardError(f"{problems[0]}; check the store with `hkd trajectories --verify {store_dir}`")


def expectation(cfg: TrajectoryConfig, teacher_hash: str | None = None, state_shape=None) -> dict[str, Any]:
    """What a training config expects of a store, for `TrajectoryDataset(..., expect=)`."""
    expect: dict[str, Any] = {"solver": cfg.solver(), "state_indices": cfg.indices()}
    if teacher_hash is not None:
        expect["teacher"] = {"hash": teacher_hash}
    if state_shape is not None:
        expect["state_shape"] = list(state_shape)
    return expect


def _mismatches(expected: Any, actual: Any, key: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        return [m for k, v in expected.items() for m in _mismatches(v, actual.get(k), f"{key}.{k}" if key else k)]
    expected = list(expected) if isinstance(expected, tuple) else expected
    return [] if expected == actual else [f"{key} is {actual!r} in the store, {expected!r} expected"]


# ---------------------------------------------------------------------------------------------------------------
# Reading


def random_intermediate_indices(num_stored: int, num_times: int, generator: torch.Generator | None = None) -> Tensor:
    """num_times positions, i.i.d. uniform among the stored states strictly between x_T and x_eps (Algorithm 1's
    t_i ~ U, on the solver's grid)."""
    if num_times and num_stored < 3:
        raise ConfigError("the store keeps no state between x_T and x_eps: add state_indices or use num_times=0")
    return torch.randint(1, num_stored - 1, (num_times,), generator=generator)


class TrajectoryDataset(torch.utils.data.Dataset):
    """A trajectory store as a map-style Dataset (works with DistributedSampler and DataLoader workers).

    Item i, float32: "states" (S, C, H, W), every stored state, at "times" (S,) (decreasing, times[0] = T =
    sigma_max, times[-1] = 0: x_eps, the generated image, comes from EDM's last step sigma_min -> 0); "x_T" and
    "x_eps" (C, H, W), the first and last states; "index", the trajectory's index in the store; with num_times > 0
    also "x_t" (num_times, C, H, W) at "t" (num_times,), drawn i.i.d. uniformly among the stored states strictly
    between x_T and x_eps, fresh each time the item is read. Shards are memory-mapped lazily, one trajectory
    copied per item, so memory does not grow with the store.
    `expect` (see `expectation`) lists what the training config requires: a store made by another teacher or with
    other settings is refused, naming the differences. An unfinished store is refused unless allow_partial
    (then only the finished shards are used). `times` (S,) are the stored states' times, `T` and `eps` the ends.
    """

    def __init__(
        self,
        store_dir: str | Path,
        num_times: int = 0,
        *,
        expect: dict[str, Any] | None = None,
        allow_partial: bool = False,
        verify: bool = True,
    ):
        self.store_dir = Path(store_dir)
        self.manifest = manifest = read_manifest(self.store_dir)
        problems = manifest_problems(manifest)
        if problems:
            raise CorruptShardError(f"trajectory store {self.store_dir}: {'; '.join(problems[:3])}")
        wrong = _mismatches(expect or {}, manifest)
        if wrong:
            raise ConfigError(f"trajectory store {self.store_dir} does not match the config: {'; '.join(wrong)}")
        names = sorted(manifest["shards"], key=lambda n: manifest["shards"][n]["trajectories"][0])
        if verify:
            _check_shards(self.store_dir, manifest, names)
        if len(names) < manifest["num_shards"] and not allow_partial:
            raise ConfigError(
                f"trajectory store {self.store_dir} is unfinished ({len(names)} of {manifest['num_shards']} shards); "
                "complete it with `hkd trajectories` (same arguments) or pass allow_partial=True"
            )
        self.shards = [(n, *manifest["shards"][n]["trajectories"]) for n in names]
        self.offsets = np.cumsum([0] + [stop - start for _, start, stop in self.shards])
        self.times = torch.tensor(manifest["times"], dtype=torch.float32)
        self.T, self.eps = manifest["solver"]["sigma_max"], manifest["solver"]["sigma_min"]
        self.num_times = num_times
        if num_times:
            random_intermediate_indices(len(self.times), 1)  # refuses a store without intermediate states
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):  # memmaps are reopened in each process, never pickled
        return {**self.__dict__, "_arrays": {}}

    def trajectory(self, i: int) -> Tensor:
        """Every stored state of trajectory i (the i-th of the finished shards): (S, C, H, W) float32."""
        if not 0 <= i < len(self):
            raise IndexError(f"trajectory {i} out of range (the store has {len(self)})")
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        name = self.shards[s][0]
        if name not in self._arrays:
            self._arrays[name] = _open_shard(self.store_dir, self.manifest, name)
        return torch.from_numpy(np.array(self._arrays[name][i - self.offsets[s]], dtype=np.float32))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        states = self.trajectory(i)
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        item = {"states": states, "times": self.times, "x_T": states[0], "x_eps": states[-1]}
        if self.num_times:
            chosen = random_intermediate_indices(len(states), self.num_times)
            item |= {"x_t": states[chosen], "t": self.times[chosen]}
        return item | {"index": self.shards[s][1] + i - int(self.offsets[s])}


class OnlineTrajectories:
    """Fresh trajectories from the teacher, instead of a store: `draw(batch_size)` solves a batch and returns the
    collated dict a DataLoader over a TrajectoryDataset gives (states (B, S, C, H, W), times (B, S), x_T, x_eps
    (B, C, H, W), index (B,), and with num_times > 0 x_t (B, num_times, C, H, W), t (B, num_times)),
    on `device`. Trajectory indices are rank, rank + world_size, ... (noise from (seed, index) as in a store);
    `next_index` is the position to save and restore for an exact resume."""

    def __init__(
        self,
        denoiser: nn.Module,
        cfg: TrajectoryConfig,
        num_times: int = 0,
        *,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ):
        self.denoiser, self.cfg, self.num_times, self.device = denoiser, cfg, num_times, device
        self.rank, self.world_size, self.next_index = rank, world_size, 0
        self.indices = cfg.indices()
        grid = time_steps(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        self.times = grid[self.indices].to(torch.float32)
        self.shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
        random_intermediate_indices(len(self.indices), min(num_times, 1))

    def draw(self, batch_size: int) -> dict[str, Tensor]:
        index = torch.arange(self.next_index, self.next_index + batch_size) * self.world_size + self.rank
        self.next_index += batch_size
        noise = torch.stack([trajectory_noise(self.cfg.seed, int(i), self.shape) for i in index]).to(self.device)
        solver = (self.cfg.num_steps, self.cfg.sigma_min, self.cfg.sigma_max, self.cfg.rho)
        _, states = heun_sampler(self.denoiser, noise, *solver)
        states = states[self.indices].transpose(0, 1).to(torch.float32)  # (B, S, C, H, W)
        times = self.times.to(states.device).expand(batch_size, -1)
        batch = {"states": states, "times": times, "x_T": states[:, 0], "x_eps": states[:, -1]}
        if self.num_times:
            chosen = [random_intermediate_indices(len(self.indices), self.num_times) for _ in range(batch_size)]
            chosen = torch.stack(chosen).to(states.device)
            batch |= {"x_t": states[torch.arange(batch_size)[:, None], chosen], "t": times.gather(1, chosen)}
        return batch | {"index": index}


# ---------------------------------------------------------------------------------------------------------------
# Batches for training


def trajectory_batch(item: Any) -> tuple[Tensor, Tensor]:
    """(states (B, K, C, H, W), times (B, K)) of a collated batch: a dict with "states" and "times"."""
    if not isinstance(item, dict) or "states" not in item or "times" not in item:
        raise TypeError("a trajectory dataset item is a dict with 'states' (K, C, H, W) and 'times' (K,)")
    return item["states"], item["times"]


class StoreBatches:
    """This rank's batches of a trajectory dataset, from (epoch, position in the epoch) on; disjoint across ranks."""

    def __init__(self, dataset, local_batch: int, rank: int, world: int, seed: int, workers: int, pin: bool):
        self.dataset, self.workers, self.pin = dataset, workers, pin
        self.first = trajectory_batch(torch.utils.data.default_collate([dataset[0]]))
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.local_batch = local_batch
        self.steps_per_epoch = len(self.sampler) // local_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {len(dataset)} trajectories, fewer than one global batch "
                f"({local_batch * world}); lower train.batch"
            )

    def epoch(self, epoch: int, start: int):
        self.sampler.set_epoch(epoch)
        indices, b = list(self.sampler), self.local_batch
        chunks = [indices[i * b : (i + 1) * b] for i in range(start, self.steps_per_epoch)]
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=chunks, num_workers=self.workers, pin_memory=self.pin
        )


class OnlineBatches:
    """Fresh trajectories from the teacher (hkd.trajectories.OnlineTrajectories) instead of a store. Global step k
    draws trajectories k B .. (k + 1) B - 1 (noise from (trajectories.seed, index)), rank r the ones = r mod world,
    so the position is the step itself; an epoch is trajectories.num_trajectories trajectories."""

    def __init__(self, teacher, trajectories: TrajectoryConfig, local_batch: int, rank: int, world: int, device):
        self.online = OnlineTrajectories(teacher, trajectories, device=device, rank=rank, world_size=world)
        self.local_batch = local_batch
        self.steps_per_epoch = trajectories.num_trajectories // (local_batch * world)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"trajectories.num_trajectories is smaller than one global batch ({local_batch * world})")
        shape = (1, len(self.online.times), *self.online.shape)
        self.first = torch.zeros(shape), self.online.times[None]

    def epoch(self, epoch: int, start: int):
        self.online.next_index = (epoch * self.steps_per_epoch + start) * self.local_batch
        for _ in range(start, self.steps_per_epoch):
            yield self.online.draw(self.local_batch)


__all__ = [
    "CorruptShardError",
    "OnlineTrajectories",
    "TrajectoryConfig",
    "TrajectoryDataset",
    "expectation",
    "read_manifest",
    "trajectory_noise",
    "verify_store",
    "write_store",
]
