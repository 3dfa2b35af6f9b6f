"""CPU threads on a busy machine: `import hkd` asks for the passive OpenMP wait policy before torch loads when other
processes keep a core busy (a user's choice wins), and the teacher has a `teacher.threads` setting like
`train.threads`. The speed itself is benchmarks/bench_busy.py's."""

import os
import subprocess
import sys

import pytest
import torch
from test_teacher import TINY

from hkd import config, openmp, teacher
from hkd.errors import ConfigError

POLICY = "import os, sys; {first}; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"


def policy_after(first: str, **env) -> str:
    """OMP_WAIT_POLICY as a fresh process sees it after `first` (and whether torch was loaded by then)."""
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = POLICY.format(first=first)
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True, timeout=300).stdout.strip()  # fmt: skip


@pytest.fixture
def busy_core():
    """One more process that keeps a core busy, at this process's priority."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        process.kill()
        process.wait()


def test_passive_wait_policy_beside_a_busy_core(busy_core):
    assert openmp.busy_cores(0.3) > 0.7  # the busy process is seen (this process's own time is not counted)
    assert policy_after("import hkd.cli") == "PASSIVE True"  # the entry point: chosen, then torch loaded
    assert policy_after("import hkd", OMP_WAIT_POLICY="active") == "active True"  # the user's choice is kept
    assert policy_after("import torch, hkd") == "None True"  # too late to matter: not set, so nothing pretends


@pytest.mark.parametrize("busy, policy", [(0.0, None), (0.49, None), (0.5, "PASSIVE"), (1.7, "PASSIVE")])
def test_wait_policy_rule(monkeypatch, busy, policy):
    monkeypatch.delitem(sys.modules, "torch")  # as before torch loads (restored afterwards)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # restored afterwards, whatever the rule sets
    monkeypatch.setattr(openmp, "busy_cores", lambda: busy)
    assert openmp.choose_wait_policy() == policy
    assert os.environ.get("OMP_WAIT_POLICY") == policy
    monkeypatch.setattr(openmp, "busy_cores", lambda: pytest.fail("measured after torch loaded"))
    monkeypatch.setitem(sys.modules, "torch", torch)
    assert openmp.choose_wait_policy() is None


def test_teacher_threads(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="teacher.threads"):
        config.load("digits", ["teacher.threads=-1"])
    with pytest.raises(ConfigError, match="teacher.threads"):
        config.load("digits", ["teacher.threads=1000000"])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(ConfigError, match="teacher.threads = 3 is more than this machine's 2 CPUs"):
        over = config.load("digits", [*TINY, "teacher.threads=3"])
        teacher.train_teacher(over.data, over.teacher, tmp_path / "over")
    assert not (tmp_path / "over").exists()  # refused before any work
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    tiny = [*TINY, "teacher.steps=1", "teacher.batch_size=8", "teacher.model_channels=4", "teacher.channel_mult=[1]"]
    one = config.load("digits", [*tiny, "teacher.threads=1"])
    teacher.train_teacher(one.data, one.teacher, tmp_path / "one", log=lambda _: None)
    assert calls == [1]
    default = config.load("digits", tiny)
    teacher.train_teacher(default.data, default.teacher, tmp_path / "default", log=lambda _: None)
    assert calls == [1]  # 0: torch's default, untouched
