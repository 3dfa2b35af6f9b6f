"""`hkd demo --quick`: every stage runs end to end on the embedded digits, and a re-run skips finished stages."""

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
    for heading in ("## Samples", "## Evaluation", "## Spectral analysis", "## Editing"):
        assert heading in report
    assert "HKD (one step)" in report and "direct regression baseline" in report
    for path in ("teacher/teacher.pt", "trajectories/manifest.json", "hkd/model", "baseline/model",
                 "eval/eval.json", "analysis/eigenvalues.png", "edit/edit_high.png", "samples.png"):  # fmt: skip
        assert (out / path).exists(), path
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
