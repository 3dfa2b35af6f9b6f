import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hkd import files


def _state(model, optimizer):
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": files.rng_state(), "step": 7}


def test_roundtrip_restores_model_optimizer_and_every_rng(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "run" / "checkpoint.pt"
    files.save(path, _state(model, optimizer))
    draws = (random.random(), np.random.rand(3), torch.rand(3))  # noqa: NPY002 (the global states)

    state = files.load(path)
    restored = torch.nn.Linear(4, 3)
    restored.load_state_dict(state["model"])
    opt2 = torch.optim.Adam(restored.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    files.set_rng_state(state["rng"])
    assert state["step"] == 7
    assert random.random() == draws[0]
    np.testing.assert_array_equal(np.random.rand(3), draws[1])  # noqa: NPY002
    torch.testing.assert_close(torch.rand(3), draws[2], rtol=0, atol=0)
    for a, b in zip(model.parameters(), restored.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert os.listdir(path.parent) == ["checkpoint.pt"]  # no temporary file left behind


def test_crash_mid_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    files.save(path, {"step": 1, "w": torch.arange(5)})
    real_save = torch.save

    def crash(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(10)  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        files.save(path, {"step": 2, "w": torch.zeros(5)})
    monkeypatch.undo()
    state = files.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(5))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_missing_and_corrupt_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        files.load(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt.*corrupt"):
        files.load(bad)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_is_a_request_then_handlers_are_restored(signum):
    before = signal.getsignal(signum)
    with files.StopSignal() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signum)
        assert stop.requested == signum
    assert signal.getsignal(signum) is before


SAVE_PRETRAINED = """
import sys, torch
from hkd import files
torch.manual_seed(0)
files.save_pretrained(sys.argv[1], {"b.weight": torch.randn(3, 5), "a.bias": torch.randn(7).double()}, {"format": "t"})
"""


def test_model_folders_are_the_same_bytes_from_every_process(tmp_path):
    """The same weights make the same file: safetensors orders its metadata by a per-process hash, hkd sorts it."""

    for name in ("one", "two", "three"):
        subprocess.run([sys.executable, "-c", SAVE_PRETRAINED, str(tmp_path / name)], check=True, timeout=300)
    blobs = {(tmp_path / name / files.WEIGHTS_NAME).read_bytes() for name in ("one", "two", "three")}
    assert len(blobs) == 1
    with safe_open(str(tmp_path / "one" / files.WEIGHTS_NAME), "pt") as f:
        assert f.metadata()["format"] == "t" and sorted(f.keys()) == ["a.bias", "b.weight"]
