"""`hkd bench` times every usable backend next to its baseline (tiny workloads here: the rows, not the speed)."""

import math

import pytest
import torch

from hkd import bench, cli


def ratios(lines: list[str], name: str) -> list[float]:
    """The numbers on the row that starts with `name` (times and ratios)."""
    (line,) = [line for line in lines if line.strip().startswith(name)]
    return [
        float(word.rstrip("x")) for word in line[len(line) - len(line.lstrip()) + len(name) :].split() if word != "ms"
    ]


def test_spectral_rows_cover_every_backend():
    lines: list[str] = []
    bench.bench_spectral([2], "cpu", repeats=2, compile=False, levels=[(4, 4, 4), (8, 2, 2)], out=lines.append)
    assert "clone (floor)" in "\n".join(lines)
    floor = ratios(lines, "clone (floor)")
    assert floor[1] == 1.0
    for backend in bench.fast_backends(torch.device("cpu")):
        fwd_ms, per_floor, per_compile, fwd_bwd_ms, _ = ratios(lines, f"hkd {backend}")
        assert fwd_ms > 0 and fwd_bwd_ms > 0 and math.isfinite(per_floor)
        assert math.isnan(per_compile)  # no torch.compile baseline in this run


def test_dense_rows_cover_every_backend():
    lines: list[str] = []
    bench.bench_dense("cpu", repeats=1, actions=[(3, 4, 2)], expms=[(2, 3)], out=lines.append)
    best = max(ratios(lines, "composite action (PyTorch)")[1], ratios(lines, "composite per-sample expm (PyTorch)")[1])
    assert best == pytest.approx(1.0)  # the better composite is the baseline
    for backend in bench.fast_backends(torch.device("cpu")):
        assert ratios(lines, f"dense_propagate {backend}")[1] > 0
        assert ratios(lines, f"hkd expm {backend}")[1] > 0
    assert ratios(lines, "torch.linalg.matrix_exp")[1] == 1.0


def test_bench_command_rejects_an_unknown_op(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", "sparse"])
    assert exit.value.code == 2 and "invalid choice: 'sparse'" in capsys.readouterr().err
