"""hkd export: the folded graph against eager HKDModel.generate, through torch.export (.pt2) and ONNX Runtime (.onnx),
at batch sizes 1 and 7 of one dynamically batched file; the errors for bad input."""

import math
import re
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
from test_model import tiny_model

from hkd import cli
from hkd.export import (
    ExportError,
    OneStepGenerator,
    _save_onnx,
    apply_matrix,
    export,
    folded_evolution,
    rotate_pairs,
    save_program,
)
from hkd.ops import reference

README = Path(__file__).parent.parent / "README.md"


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|."""
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


def run_exported(path: Path, fmt: str, *inputs: torch.Tensor) -> torch.Tensor:
    """The exported file's output, loaded as a user without hkd would: torch.export.load or ONNX Runtime (CPU)."""
    if fmt == "pt2":
        with torch.no_grad():
            return torch.export.load(path).module()(*inputs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs, strict=True)}
    return torch.from_numpy(session.run(["images"], feeds)[0])


@pytest.mark.parametrize("generator,per_position", [("spectral", True), ("spectral", False), ("dense", False),
                                                    ("dense", True)])  # fmt: skip
def test_folded_evolution_is_the_propagator_in_float64(generator, per_position):
    model = tiny_model(generator=generator, per_position=per_position)
    tau, prop = model.tau(model.T, model.eps), model.propagator
    factors = folded_evolution(model)
    for batch in (3, 0):
        # non-contiguous latents: every level a transposed view
        latents = [torch.randn(batch, d, w, h, dtype=torch.float64).transpose(2, 3) for d, h, w in prop.level_shapes]
        if generator == "spectral":
            expected = reference.spectral_propagate(latents, list(prop.alphas), list(prop.betas), tau)
            got = [rotate_pairs(z, re, im) for z, (re, im) in zip(latents, factors, strict=True)]
        else:
            expected = reference.dense_propagate(latents, list(prop.generators), tau)
            got = [apply_matrix(z, M) for z, (M,) in zip(latents, factors, strict=True)]
        for z, g, e in zip(latents, got, expected, strict=True):
            assert g.shape == e.shape and g.dtype == torch.float64
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
            assert batch == 0 or (e - z).abs().max() > 0.1  # the generators do evolve the latents


def test_without_koopman_evolution_the_graph_is_encode_then_decode():
    model = tiny_model(koopman=False)
    assert folded_evolution(model) == []
    noise = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(OneStepGenerator(model)(noise), model.generate(noise))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("generator,per_position", [("spectral", True), ("dense", False)])
def test_exported_file_reproduces_eager_at_batch_1_and_7(tmp_path, fmt, generator, per_position):
    model = tiny_model(generator=generator, per_position=per_position)
    model.save_pretrained(tmp_path / "model")
    path = export(tmp_path / "model", tmp_path / f"model.{fmt}", fmt, dynamic_batch=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", f"model.{fmt}"]  # no temporary file left
    for batch in (1, 7):
        noise = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            eager = model.generate(noise)
        got = run_exported(path, fmt, noise)
        assert got.shape == eager.shape and got.dtype == torch.float32
        assert relative_error(got, eager) < 1e-4, (batch, relative_error(got, eager))
    if fmt == "pt2":  # only core ATen ops: no hkd custom op, nothing that needs hkd to load
        program = torch.export.load(path)
        targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
        assert not [t for t in targets if isinstance(t, torch._ops.OpOverload) and t.namespace != "aten"]


@pytest.mark.slow
def test_cli_and_the_readme_onnx_example_without_torch_or_hkd(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "model")
    argv = ["export", "--model", str(tmp_path / "model"), "--format", "onnx", "--out", str(tmp_path / "model.onnx")]
    assert cli.main([*argv, "--dynamic-batch"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'model.onnx'}"
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (example,) = [b for b in blocks if "import onnxruntime" in b]
    (tmp_path / "example.py").write_text(example)
    block = "import sys; sys.modules['torch'] = sys.modules['hkd'] = None; exec(open('example.py').read())"
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(16, 3, 8, 8) uint8" in result.stdout


@pytest.mark.slow
def test_a_static_batch(tmp_path):
    model = tiny_model()
    path = export(model, tmp_path / "model.pt2", "pt2", batch=3)
    noise = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert relative_error(run_exported(path, "pt2", noise), model.generate(noise)) < 1e-4
    with pytest.raises(Exception, match="(?i)shape|size|expected"):
        run_exported(path, "pt2", torch.randn(2, 3, 8, 8))


# float16 and the time input through ONNX: its graph is torch.export's, which the .pt2 tests cover besides


@pytest.mark.slow
def test_float16_export(tmp_path):
    model = tiny_model()
    path = export(model, tmp_path / "model.onnx", "onnx", dynamic_batch=True, dtype="float16")
    noise = torch.randn(7, 3, 8, 8)
    got = run_exported(path, "onnx", noise.half())
    with torch.no_grad():
        eager = model.generate(noise)
    assert got.dtype == torch.float16
    assert relative_error(got, eager) < 1e-2  # half precision: about 1e-3 here


@pytest.mark.slow
def test_time_input_gives_the_trajectory(tmp_path):
    model = tiny_model(clock="log")
    path = export(model, tmp_path / "model.onnx", "onnx", dynamic_batch=True, time_input=True)
    for batch in (1, 7):
        noise = torch.randn(batch, 3, 8, 8)
        t = torch.exp(torch.empty(batch).uniform_(math.log(model.eps), math.log(model.T)))  # one time per sample
        t[0] = model.eps
        with torch.no_grad():
            eager = torch.cat([model.trajectory(noise[i : i + 1], [float(t[i])])[0] for i in range(batch)])
            assert relative_error(eager[:1], model.generate(noise[:1])) < 1e-4
        assert relative_error(run_exported(path, "onnx", noise, t), eager) < 1e-4


def test_time_input_needs_spectral_generators(tmp_path):
    with pytest.raises(ExportError, match="--time-input needs spectral generators"):
        export(tiny_model(generator="dense"), tmp_path / "model.onnx", "onnx", time_input=True)


# Bad input ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option,message",
    [(dict(format="tflite"), "unknown export format 'tflite'"), (dict(dtype="int8"), "unknown export dtype 'int8'"),
     (dict(batch=0), "batch must be >= 1")],
)  # fmt: skip
def test_bad_options_fail_before_loading_anything(tmp_path, option, message):
    kwargs = dict(format="onnx") | option
    with pytest.raises(ExportError, match=re.escape(message)):
        export(tmp_path / "no such folder", tmp_path / "model.out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_model_folder_that_does_not_load(tmp_path):
    with pytest.raises(ExportError, match=f"model folder '{re.escape(str(tmp_path / 'missing'))}' does not load"):
        export(tmp_path / "missing", tmp_path / "model.pt2", "pt2")
    folder = tmp_path / "corrupt"
    tiny_model().save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="corrupt.*does not load.*model.safetensors"):
        export(folder, tmp_path / "model.pt2", "pt2")
    with pytest.raises(ExportError, match="is not a folder"):
        export(folder, tmp_path / "no" / "model.pt2", "pt2")
    assert not (tmp_path / "model.pt2").exists()


@pytest.mark.parametrize(
    "argv,message",
    [(["--format", "tflite"], "unknown export format 'tflite'"), (["--format", "pt2", "--dtype", "bf16"], "'bf16'"),
     (["--format", "pt2", "--model", "MISSING"], "does not load")],
)  # fmt: skip
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    model = tmp_path / "model"
    tiny_model().save_pretrained(model)
    argv = ["export", "--model", str(model), "--out", str(tmp_path / "x"), *argv]
    argv = [str(tmp_path / "missing") if a == "MISSING" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hkd export: error: ") and message in err, err


@torch.library.custom_op("hkd_test::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@opaque.register_fake
def _(x):
    return torch.empty_like(x)


class WithCustomOp(torch.nn.Module):
    def forward(self, noise):
        return 2 * opaque(noise)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_an_op_that_does_not_export_is_named(tmp_path, fmt):
    with pytest.raises(ExportError, match=r"hkd_test\.opaque"):
        save_program(WithCustomOp(), (torch.randn(2, 3),), tmp_path / f"m.{fmt}", fmt, dynamic_batch=True)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left
    # torch.onnx's own failure, without the check before it, names the op too
    program = torch.export.export(WithCustomOp(), (torch.randn(2, 3),))
    with pytest.raises(ExportError, match=r"ONNX export failed: .*hkd_test\.opaque") as failure:
        _save_onnx(program, tmp_path / "m.onnx", ["noise"])
    assert "\n" not in str(failure.value)


def test_a_data_dependent_branch_is_a_one_line_error(tmp_path):
    class Branch(torch.nn.Module):
        def forward(self, noise):
            return noise if noise.sum() > 0 else -noise

    with pytest.raises(ExportError, match="torch.export failed: .*data-dependent") as failure:
        save_program(Branch(), (torch.randn(2, 3),), tmp_path / "m.pt2", "pt2", dynamic_batch=True)
    assert "\n" not in str(failure.value)
