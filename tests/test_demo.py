"""`hkd demo --quick`: every stage runs end to end on the embedded digits, and a re-run skips finished stages."""

import json
import math
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "hkd.cli", "demo", "--quick", "--out", str(out), "train.threads=1"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = (out / "report.md").read_text()
    for heading in ("## Samples", "## Evaluation", "## Learning curve", "## Spectral analysis", "## Editing"):
        assert heading in report
    assert "`hkd demo --quality`" in report  # the ablation runs only at that scale
    assert "HKD (one step)" in report and "direct regression baseline" in report
    for path in ("teacher/teacher.pt", "trajectories/manifest.json", "hkd/model", "baseline/model",
                 "eval/eval.json", "analysis/eigenvalues.png", "edit/edit_high.png", "samples.png",
                 "curve/curve.png"):  # fmt: skip
        assert (out / path).exists(), path
    curves = json.loads((out / "curve" / "curve.json").read_text())
    assert sorted(curves) == ["HKD", "direct regression"]
    for rows in curves.values():  # the quick runs: 128 trajectories / batch 32 = 4 steps, the last milestone the end
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["fd_digits"]) for r in rows)
    assert curves["HKD"][-1]["forward_passes"] == 5 * curves["direct regression"][-1]["forward_passes"]
    # the trajectory at each milestone: direct regression's evolution is the identity, so r_A = r_0 exactly
    assert all(r["relative_mean"] == pytest.approx(1.0) for r in curves["direct regression"])
    assert all(math.isfinite(r["relative_mean"]) and r["decoded_mse_mean"] >= 0 for r in curves["HKD"])
    assert "relative_mean" in (out / "curve" / "curve.md").read_text()
    # every link in the report points at a file that exists
    import re

    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / link).is_file(), link

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done earlier, skipped") >= 5, second.stdout


def test_demo_rejects_a_misspelt_override(tmp_path):
    cmd = [sys.executable, "-m", "hkd.cli", "demo", "--quick", "--out", str(tmp_path), "train.epochz=3"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "train.epochz" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_quality_demo_adds_the_ablation_reusing_its_runs(tmp_path):
    """--quality at the quick preset's toy sizes (overrides come last): the ablation's table lands in the report,
    and its HKD and direct regression rows are the demo's own runs, not trained again."""
    from hkd.demo import QUICK

    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "hkd.cli", "demo", "--quality", "--out", str(out), "train.threads=1", *QUICK]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "## Ablation" in report and "Koopman + trajectory loss, no hierarchy" in report
    trained = sorted(p.name for p in (out / "ablation").iterdir() if p.is_dir())
    assert trained == ["Koopman_and_trajectory_loss_no_hierarchy", "Koopman_no_trajectory_loss"]
    rows = {r["name"]: r for r in json.loads((out / "ablation" / "ablation.json").read_text())}
    assert rows["HKD (all three)"]["steps"] == rows["direct regression"]["steps"] == 4  # the quick preset's 4 steps
    assert rows["HKD (all three)"]["forward_passes"] == 5 * rows["direct regression"]["forward_passes"]
    bad = subprocess.run([*cmd[:4], "--quick", *cmd[4:]], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not allowed with argument" in bad.stderr
