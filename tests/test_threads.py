"""CPU threads on a busy machine: `hkd` sets a passive OpenMP wait policy before torch loads (a user's choice wins),
and the teacher has a `teacher.threads` setting like `train.threads`. The speed itself is benchmarks/bench_busy.py's."""

import os
import subprocess
import sys

import pytest
import torch
from test_teacher import TINY

from hkd import config, teacher
from hkd.errors import ConfigError

POLICY = "import os, sys; {first}; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"


def policy_after(first: str, **env) -> str:
    """OMP_WAIT_POLICY as a fresh process sees it after `first` (and whether torch was loaded by then)."""
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = POLICY.format(first=first)
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True, timeout=300).stdout.strip()  # fmt: skip


def test_hkd_sets_a_passive_wait_policy_before_torch_loads():
    assert policy_after("import hkd.cli") == "PASSIVE True"  # the entry point: set, then torch loaded
    assert policy_after("import hkd", OMP_WAIT_POLICY="active") == "active True"  # the user's choice is kept
    assert policy_after("import torch, hkd") == "None True"  # too late to matter: not set, so nothing pretends


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
