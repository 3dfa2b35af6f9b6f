"""A compiled extension that is installed but does not load is never silent: `import hkd` warns once with the
loader's message and the fix, `hkd info` prints it, backend="cpu" raises with it, and backend="auto" says once that it
fell back to the reference ops. The failure is planted by a meta-path hook whose loader raises the ImportError that a
torch ABI mismatch gives."""

import json
import subprocess
import sys

import pytest

from hkd.ops import _backend

# Runs in a fresh interpreter: hkd must not be imported before the hook is in place.
SCRIPT = r"""
import contextlib, importlib.abc, io, json, sys, warnings

class BrokenLoader(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError("undefined symbol: _ZN3c1015SmallVectorBase8grow_podEPKvmm")
    def exec_module(self, module):
        pass

class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "hkd._C":
            return None
        for finder in sys.meta_path:  # the real spec (its origin locates the build record), with a failing loader
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    spec.loader = BrokenLoader()
                    return spec
        return None

if sys.argv[1] == "broken":
    sys.meta_path.insert(0, Broken())
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import hkd
    from hkd.cli import main
    from hkd.ops import _backend, spectral_propagate
    out["import"] = [str(w.message) for w in caught if issubclass(w.category, _backend.ExtensionLoadWarning)]
    caught.clear()
    z, a = torch.randn(2, 4, 3), torch.randn(2, 3)
    try:
        spectral_propagate([z], [a], [a], 0.5, backend="cpu")
        out["cpu"] = "ran"
    except RuntimeError as error:
        out["cpu"] = str(error)
    for _ in range(2):
        spectral_propagate([z], [a], [a], 0.5, backend="auto")
    out["auto"] = [str(w.message) for w in caught if issubclass(w.category, _backend.ExtensionLoadWarning)]
    info = io.StringIO()
    with contextlib.redirect_stdout(info):
        main(["info"])
    out["info"] = info.getvalue()
print(json.dumps(out))
"""


def run(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _backend.extension_loaded(), reason="hkd._C not built")
def test_a_broken_extension_is_loud():
    out = run("broken")
    assert len(out["import"]) == 1, out["import"]  # once, at import
    warning = out["import"][0]
    assert "undefined symbol: _ZN3c10" in warning and "pip install" in warning
    built = _backend.build_info()
    assert built, "the build records which torch it was built against (_C_build.json next to hkd._C)"
    assert f"built for torch {built['torch']}" in warning
    assert "undefined symbol" in out["cpu"] and "backend 'cpu'" in out["cpu"]
    assert len(out["auto"]) == 1 and "reference" in out["auto"][0] and "undefined symbol" in out["auto"][0]
    assert "FAILED TO LOAD" in out["info"] and "undefined symbol" in out["info"]


@pytest.mark.skipif(not _backend.extension_loaded(), reason="hkd._C not built")
def test_a_working_extension_is_quiet():
    out = run("working")
    assert out["import"] == [] and out["auto"] == [] and out["cpu"] == "ran"
    built = _backend.build_info()
    assert f"built against torch {built['torch']}" in out["info"], out["info"]


def test_build_record_is_json():
    record = _backend.build_info()
    if _backend.extension_loaded():
        assert json.loads(json.dumps(record)) == record and {"torch", "torch_min", "python_api"} <= set(record)
