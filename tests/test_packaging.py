"""Every module the package imports at module level is a declared dependency, and every module the tests import is
in the test extras: a fresh environment built from pyproject.toml alone has all of them.

An import made inside a function is an optional one: the function raises a clear error naming the extra to install.
"""

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]

# import name -> distribution name, where they differ
DISTRIBUTION = {
    "yaml": "pyyaml",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "torch_fidelity": "torch-fidelity",
    "skimage": "scikit-image",
}
# the Triton kernels are imported only behind hkd.ops' check that triton is installed (the `triton` extra)
OPTIONAL_PACKAGES = {"kernels": "triton"}
# hkd.pipeline is the diffusers integration (HKDPipeline subclasses DiffusionPipeline): it needs the `diffusers` extra,
# and hkd imports it only inside the functions that use it (`hkd export --format diffusers`)
OPTIONAL_MODULES = {"hkd/pipeline.py": "diffusers"}


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    return core, extras


def module_level_imports(path: Path) -> set[str]:
    """Top-level module names imported by statements that run on import (not inside a function or class body)."""
    names = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text(), str(path)).body)
    return names


def importorskips(path: Path) -> set[str]:
    return {m.split(".")[0] for m in re.findall(r"importorskip\(\s*[\"']([\w.]+)[\"']", path.read_text())}


def third_party(names: set[str]) -> set[str]:
    local = {"hkd", "kernels", "conftest", "helpers"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


def distribution(module: str) -> str:
    return DISTRIBUTION.get(module, module).lower().replace("_", "-")


@pytest.mark.parametrize("folder", ["hkd", "kernels"])
def test_module_level_imports_are_declared(folder):
    core, extras = declared()
    allowed = core | extras.get(OPTIONAL_PACKAGES.get(folder, ""), set())
    missing = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in (ROOT / folder).rglob("*.py")
        for module in third_party(module_level_imports(path))
        if distribution(module)
        not in allowed | extras.get(OPTIONAL_MODULES.get(str(path.relative_to(ROOT)), ""), set())
    }
    assert not missing, f"imported at module level but not declared in pyproject.toml: {sorted(missing)}"


def test_test_imports_are_in_the_test_extras():
    core, extras = declared()
    allowed = core | extras["test"]
    missing = {
        f"{path.relative_to(ROOT)}: {module}"
        for folder in ("tests", "benchmarks")
        for path in (ROOT / folder).glob("*.py")
        for module in third_party(module_level_imports(path) | importorskips(path))
        if distribution(module) not in allowed
    }
    assert not missing, f"imported by the tests but not in the test extras: {sorted(missing)}"


def test_the_rule_sees_an_undeclared_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\nimport numpy\ntry:\n    import not_a_dependency\nexcept ImportError:\n    pass\n"
        "def f():\n    import lazily_imported\n"
    )
    assert third_party(module_level_imports(probe)) == {"numpy", "not_a_dependency"}


def test_ci_runs_the_readme_test_command_word_for_word():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^README_TEST_COMMAND='(.*)'$", ci, re.M).group(1)
    assert "python -m pytest" in command and '-e ".[test]"' in command
    assert f"```bash\n{command}\n```" in readme
