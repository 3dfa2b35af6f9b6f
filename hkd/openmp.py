"""The OpenMP wait policy, chosen from the machine's load before torch loads its OpenMP runtime.

torch's OpenMP threads spin at barriers for a while before they sleep. On an idle machine that is what makes many
small ops fast. On a core that another process also wants, one thread is descheduled while its peers spin, and the
work runs several times slower than on one thread. The passive policy (threads sleep at once) avoids that collapse,
but costs an idle machine much of its speed: threads are woken at every parallel region. So when `import hkd` comes
before torch's, it watches the CPUs for a moment and asks for the passive policy only if other processes keep a core
busy. The policy changes timing only, never results, and a user's own OMP_WAIT_POLICY is always kept.

Time at a higher nice value than hkd's own counts as idle: the kernel runs hkd's threads first.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SAMPLE_S = 0.1  # how long the CPUs are watched
BUSY_CORE = 0.5  # other processes' load, in cores, from which the passive policy is chosen


def _busy_ticks(cpus: set[int], count_nice: bool) -> int:
    """Clock ticks the CPUs in `cpus` spent working since boot (user, system, irq, softirq, steal; nice optionally)."""
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        busy += user + system + irq + softirq + steal + (nice if count_nice else 0)
    return busy


def _own_ticks() -> int:
    """Clock ticks this process (all its threads) has run, user + system."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def busy_cores(seconds: float = SAMPLE_S) -> float:
    """How many of this process's allowed CPUs other processes keep busy, watched for `seconds`."""
    cpus = os.sched_getaffinity(0)
    count_nice = os.nice(0) > 0  # a niced hkd competes with other niced work as an equal
    start, own, t0 = _busy_ticks(cpus, count_nice), _own_ticks(), time.monotonic()
    time.sleep(seconds)
    busy = _busy_ticks(cpus, count_nice) - start - (_own_ticks() - own)
    ticks = (time.monotonic() - t0) * os.sysconf("SC_CLK_TCK")
    return min(max(busy / ticks, 0.0), float(len(cpus)))


def choose_wait_policy() -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE if other processes keep a core busy; returns the policy set (None: left alone).

    Only before torch loads (the policy is read once, then), and only where the user has not chosen one."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return None
    try:
        busy = busy_cores()
    except (OSError, ValueError, AttributeError):  # no /proc (not Linux): torch's default
        return None
    if busy < BUSY_CORE:
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"
