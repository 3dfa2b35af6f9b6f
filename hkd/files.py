"""Every file hkd writes and reads back: atomic, checksummed, pickle-free; plus resume state and run control, and
model folders (save_pretrained / load_pretrained: safetensors weights and a JSON config).

    files.save(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), ...,
                      "rng": files.rng_state(), "step": step})
    state = files.load(path); model.load_state_dict(state["model"]); files.set_rng_state(state["rng"])

* `atomic_write` is the one way hkd writes a file: a temporary file in the same folder (created with the user's
  umask), flushed to disk and renamed over the target (os.replace is atomic), so a kill at any moment leaves either
  the old file or the new one. A kill -9 can leave a temporary file (`.NAME.XXXXXXXX.hkd.tmp`): `run_lock` removes
  those of the folder it locks, where no other hkd process can be writing.
* `save` refuses a state with a NaN or inf tensor (the last good checkpoint stays) and stores a sha256 `digest` of
  the whole state, which `load` checks: flipped bytes are an error naming the file, never silently loaded weights.
  Everything loads with torch.load(weights_only=True): RNG states are tensors and plain tuples, never pickled objects.
* `run_lock` stops two runs writing into one folder; `StopSignal` turns SIGTERM/SIGINT into a request the loop polls.
* Untrusted files cost a bounded amount: `read_json` reads at most JSON_BYTES and refuses NaN and infinities,
  `check_archive` refuses a zip (torch file, .npz) whose records declare more bytes than allowed before anything is
  inflated, `torch_load` reads a torch file after that check. `refuse_replace` keeps every file hkd did not write.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import secrets
import signal
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from hkd.errors import ConfigError, CorruptFileError, MissingFileError, NonFiniteError, UserError, brief

TMP_SUFFIX = ".hkd.tmp"
LOCK_NAME = ".hkd.lock"
DIGEST_KEY = "sha256"
JSON_BYTES = 16 << 20  # the largest JSON file (config.json, manifest.json) read


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` (`.NAME.XXXXXXXX.hkd.tmp`, a name no user file has) to write; renamed over
    `path` when the block ends without an error, removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Write `data` (bytes, text, or a function writing to a binary file) to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "xb") as file:  # mode 0o666 & ~umask, like any other new file
        if callable(data):
            data(file)
        else:
            file.write(data.encode() if isinstance(data, str) else data)
        file.flush()
        os.fsync(file.fileno())
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def refuse_replace(path: str | os.PathLike, ours: Callable[[Path], bool], overwrite: bool, what: str = "--out"):
    """Before any work: `path`, a file about to be written, may be replaced only when it is hkd's own earlier output
    (`ours(path)`) and `overwrite` is set. A folder in its place, a file hkd did not write, or one of hkd's without
    --overwrite is a UserError naming it."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a folder; name a file to write")
    if not path.is_file() or path.is_symlink() or not ours(path):
        raise UserError(f"{what} {str(path)!r} exists and hkd did not write it; choose another name (nothing replaced)")
    if not overwrite:
        raise UserError(f"{what} {str(path)!r} exists (an earlier hkd output): pass --overwrite to replace it")


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """The JSON value of a file hkd reads (config.json, manifest.json): at most JSON_BYTES, no NaN or infinity, or a
    CorruptFileError naming the file (MissingFileError when it is not there)."""
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found")
    if path.stat().st_size > JSON_BYTES:
        raise CorruptFileError(f"{what} is {path.stat().st_size} bytes, larger than hkd reads ({JSON_BYTES})")

    def nonfinite(text):
        raise ValueError(f"{text} is not a finite number")

    def number(text):
        value = float(text)
        return value if value not in (float("inf"), float("-inf")) else nonfinite(brief(text, 30, plain=True))

    try:
        with open(path, "rb") as file:
            return json.loads(file.read(JSON_BYTES + 1), parse_constant=nonfinite, parse_float=number)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise CorruptFileError(f"{what} is corrupt: {brief(str(error), 200, plain=True)}") from None


def check_archive(source: str | os.PathLike | BinaryIO, what: str, max_bytes: int) -> None:
    """A zip file (a torch file, an .npz) whose records declare more than `max_bytes` in all, uncompressed, is a
    CorruptFileError naming it, found from the central directory before anything is inflated (a reader then stops at
    each record's declared size). Not a zip file: nothing to check."""
    try:
        if not zipfile.is_zipfile(source):
            return
        with zipfile.ZipFile(source) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise CorruptFileError(f"{what} is a corrupt zip file ({error})") from None
    finally:
        if hasattr(source, "seek"):
            source.seek(0)
    if declared > max_bytes:
        raise CorruptFileError(
            f"{what} declares {declared} bytes of records, more than its {max_bytes} allowed (a compression bomb?)"
        )


def torch_load(path: str | os.PathLike, what: str = "", map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True) of a file whose zip records (torch.save stores them uncompressed) declare no
    more bytes than the file has: memory stays within the file's size."""
    path = Path(path)
    check_archive(path, what or str(path), path.stat().st_size)
    return torch.load(path, map_location=map_location, weights_only=True)


def digest(value: Any) -> str:
    """sha256 of a nested state (dicts, lists, tuples, tensors, arrays, numbers, strings), in iteration order:
    every tensor's dtype, shape and bytes, every other leaf's type and repr."""
    h = hashlib.sha256()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        elif isinstance(x, np.ndarray):
            h.update(f"A{x.dtype}{x.shape}".encode() + np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for key, item in x.items():
                visit(key)
                visit(item)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__[0]}{len(x)}".encode())
            for item in x:
                visit(item)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    visit(value)
    return h.hexdigest()


def nonfinite(value: Any, prefix: str = "") -> list[str]:
    """The keys (a.b.c) of the floating-point tensors in a nested state that hold a NaN or inf."""
    if isinstance(value, torch.Tensor):
        return [prefix or "tensor"] if value.is_floating_point() and not torch.isfinite(value).all() else []
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return []
    return [bad for key, item in items for bad in nonfinite(item, f"{prefix}.{key}" if prefix else str(key))]


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` (a dict) to `path` atomically, with its `digest`; a state holding a NaN or inf tensor is refused
    (NonFiniteError) and the file already at `path` is kept."""
    bad = nonfinite(state)
    if bad:
        bad = ", ".join(bad[:5])
        raise NonFiniteError(f"not writing {path}: non-finite values in {bad}; the file already there is kept")
    checked = {**state, DIGEST_KEY: digest(state)}
    atomic_write(path, lambda file: torch.save(checked, file))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save` and check its digest; a missing, corrupt or altered file is an error
    naming it. Only tensors and plain values load (weights_only=True): nothing from the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch_load(path, f"checkpoint {str(path)!r}", map_location)
    except CorruptFileError:
        raise
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptFileError(f"checkpoint {str(path)!r} is corrupt or not an hkd checkpoint ({reason})") from error
    if not isinstance(state, dict):
        raise CorruptFileError(f"checkpoint {str(path)!r} is not an hkd checkpoint (a {type(state).__name__})")
    expected = state.pop(DIGEST_KEY, None)  # files from before checksums carry none
    if expected is not None and digest(state) != expected:
        raise CorruptFileError(f"checkpoint {str(path)!r} is corrupt: its checksum differs (altered or damaged)")
    return state


RESUME_HINT = "run the same command again with --resume to continue"


def resume_from(path: str | os.PathLike, resume: bool, where: str, map_location="cpu") -> dict[str, Any] | None:
    """How `hkd train` and `hkd train-teacher` start: with resume, from the checkpoint at `path` (which must exist);
    without, from scratch (and a checkpoint there is refused, never overwritten). `where` names the option or key
    that sets the folder. Returns the loaded state, or None."""
    path = Path(path)
    if resume and not path.is_file():
        raise MissingFileError(f"--resume: no checkpoint at {path}")
    if not resume and path.is_file():
        raise ConfigError(f"{path} exists: pass --resume to continue that run, or choose another {where}")
    return load(path, map_location) if resume else None


def output_folder(path: str | os.PathLike, what: str = "output folder", create: bool = True) -> Path:
    """`path` as a folder hkd may write into, created if needed; a file in the way, a read-only place or a missing
    permission is a UserError naming `what` and the path, found before any work. create=False only checks (a
    command checks its --out with its other inputs, and the folder is made when the work starts)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {str(path)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r}: {str(existing)!r} is read-only (no permission to write there)")
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{what} {str(path)!r}: cannot create it ({error.strerror})") from error
    return path


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `folder`/.hkd.lock for one run: a second run into the same folder is refused (UserError) while this one
    lives (the lock goes with the process, even on kill -9). Then removes the temporary files a killed writer left
    in the folder, since no other hkd process can be writing there."""
    folder = output_folder(folder)
    with open(folder / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            message = f"{folder} is in use by another hkd run (pid {owner}); wait for it or use another folder"
            raise UserError(message) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        for stale in folder.rglob(f".*{TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def rng_state() -> dict[str, Any]:
    """The random states of python, numpy, torch (CPU) and every CUDA device."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global state is what we save)
    state = {
        "python": (version, mt, gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignal:
    """Turns SIGTERM and SIGINT into a request the loop polls (`stop.requested`), so it can write a checkpoint
    and leave cleanly. A second signal of the same kind gets the previous handler (Ctrl-C twice still kills)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


# ---------------------------------------------------------------------------------------------------------------
# Model folders: weights and config, as save_pretrained / from_pretrained write and read them

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"


def save_pretrained(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """directory/model.safetensors (the state dict, with the sha256 `digest` of its tensors in the metadata) and
    directory/config.json (`config`, a JSON object with its "format"), each atomic. Non-finite weights are refused."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in sorted(state.items())}
    bad = nonfinite(state)
    if bad:
        raise NonFiniteError(f"not saving the model to {directory}: non-finite weights in {', '.join(bad[:5])}")
    metadata = {"format": config["format"], DIGEST_KEY: digest(state)}
    atomic_write(Path(directory) / WEIGHTS_NAME, _sorted_header(save(state, metadata=metadata)))
    atomic_write(Path(directory) / CONFIG_NAME, json.dumps(config, indent=2) + "\n")


def _sorted_header(blob: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted: safetensors writes the metadata in the order of a hash
    map, which changes from process to process, so the same weights gave different files. Offsets are relative to
    the data, which is unchanged; the header stays padded to 8 bytes, as the format asks."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + blob[8 + n :]


def load_pretrained(directory: str | os.PathLike, kind: str, build: Callable[[dict[str, Any]], torch.nn.Module]):
    """The module `build(config)` makes from directory/config.json (whose "format" must be `kind`), with the
    weights of directory/model.safetensors, on the CPU. The config's tensor shapes (built on the meta device, nothing
    allocated) are checked against the weight file's before anything is allocated, and the weights against their
    checksum; a missing, corrupt or mismatched file is an error naming it. Only JSON and safetensors are read."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MissingFileError(f"{path} not found (a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    saved = read_json(config_path)
    if not isinstance(saved, dict) or saved.get("format") != kind:
        raise CorruptFileError(f"{config_path} is not an HKD model config (format {kind!r})")
    try:
        with safe_open(str(weights_path), framework="pt") as file:
            metadata = file.metadata() or {}
            shapes = {k: tuple(file.get_slice(k).get_shape()) for k in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptFileError(f"{weights_path} is corrupt or not a safetensors file: {error}") from error
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build(saved).state_dict().items()}
    _check_shapes(expected, shapes, f"{weights_path} does not match {CONFIG_NAME}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptFileError(f"{weights_path} is corrupt or not a safetensors file: {error}") from error
    saved_digest = metadata.get(DIGEST_KEY)  # files from before checksums carry none
    if saved_digest is not None and digest(dict(sorted(state.items()))) != saved_digest:
        raise CorruptFileError(f"{weights_path} is corrupt: its checksum differs (altered or damaged)")
    module = build(saved)
    module.load_state_dict(state)
    return module


def _check_shapes(expected: dict[str, tuple], found: dict[str, tuple], what: str) -> None:
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [f"{k} {found[k]} != {v}" for k, v in expected.items() if k in found and found[k] != v]
    if missing or unexpected or shapes:
        problems = [f"missing {missing[:5]}" * bool(missing), f"unexpected {unexpected[:5]}" * bool(unexpected)]
        problems += [f"shapes {shapes[:5]}" * bool(shapes)]
        raise CorruptFileError(f"{what}: {'; '.join(p for p in problems if p)}")
