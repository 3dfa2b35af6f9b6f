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
    workload = {"workloads": [(3, 4, 2)], "classes": ("gaussian 2",), "tau_maxes": (1.0,), "plain": False}
    bench.bench_dense("cpu", repeats=1, expms=[(2, 3)], out=lines.append, **workload)
    best = max(ratios(lines, "composite Taylor (PyTorch)")[1], ratios(lines, "composite per-sample expm (PyTorch)")[1])
    assert best == pytest.approx(1.0)  # the better composite is the baseline
    for backend in bench.fast_backends(torch.device("cpu")):
        assert ratios(lines, f"dense_propagate {backend}")[1] > 0
        assert ratios(lines, f"fwd+bwd dense_propagate {backend}")[1] > 0
        assert ratios(lines, f"hkd expm {backend}")[1] > 0
    assert ratios(lines, "torch.linalg.matrix_exp")[1] == 1.0


def test_dense_matrix_classes():
    norms = {
        kind: float(torch.linalg.matrix_norm(bench.dense_generator(kind, 16), ord=1)) for kind in bench.MATRIX_CLASSES
    }
    assert norms["gaussian 2"] == pytest.approx(2) and norms["gaussian 60"] == pytest.approx(60)
    S = bench.dense_generator("skew-symmetric", 16)
    torch.testing.assert_close(S, -S.T)
    assert torch.linalg.eigvals(bench.dense_generator("hkd-like", 16)).real.abs().max() <= 0.05 + 1e-9
    assert torch.linalg.eigvals(bench.dense_generator("gaussian 15", 16)).real.max() <= 1e-9
    with pytest.raises(ValueError, match="unknown matrix class"):
        bench.dense_generator("sparse", 4)


def test_bench_command_rejects_an_unknown_op(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", "sparse"])
    assert exit.value.code == 2 and "invalid choice: 'sparse'" in capsys.readouterr().err
