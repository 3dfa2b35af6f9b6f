"""The package, its extension and its command line are installed and consistent."""

import subprocess
import sys

import torch

import hkd
from hkd.ops import _backend


def test_extension_imports_and_reports_its_build():
    from hkd import _C

    assert isinstance(_C.WITH_CUDA, bool)
    assert _backend.extension_loaded()
    assert _backend.resolve("auto", torch.device("cpu")) in ("cpu", "reference")


def test_kernels_install_inside_the_package():
    import hkd.kernels

    assert hkd.kernels.__name__ == "hkd.kernels"
    assert "kernels" in hkd.kernels.__file__


def test_unknown_backend_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        _backend.resolve("tpu", torch.device("cpu"))


def test_cli_version_and_info():
    out = subprocess.run([sys.executable, "-m", "hkd.cli", "--version"], capture_output=True, text=True, check=True)
    assert hkd.__version__ in out.stdout
    info = subprocess.run([sys.executable, "-m", "hkd.cli", "info"], capture_output=True, text=True, check=True)
    assert "torch" in info.stdout and "backends usable on cpu" in info.stdout


def test_ruff_passes():
    import shutil
    from pathlib import Path

    import pytest

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([ruff, "check", str(root)], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
