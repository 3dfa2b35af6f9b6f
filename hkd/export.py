"""`hkd export`: the one-step generator as a self-contained graph, for torch.export (.pt2) and ONNX (.onnx).

The exported map takes standard-normal noise n (B, C, R, R) and returns the image (the teacher's denoised-image
space, as HKDModel.generate):

    x_eps = D(exp((eps - T) A) E(T n))

with every fixed-time quantity folded into constants, so the graph holds only standard ops (no hkd custom op):
* the encoder's input scale c_in(T) T and the noise label c_noise(T) = ln(T) / 4 (one label, broadcast over the
  batch; for a diffusers-backed model the VP timestep of T), the decoder's output scale c_out(T), and where the
  model keeps its teacher's skip term, c_skip(T) T (times the noise, added to the output);
* exp(tau A^(l)), tau = tau(T, eps): for spectral generators the per-level factors exp(alpha tau) cos(beta tau) and
  exp(alpha tau) sin(beta tau) (an elementwise complex multiplication per channel pair), for dense generators one
  matrix expm(tau A^(l)) per level (or per position), all computed in float64 and stored in the export dtype.

With time_input=True the graph instead takes (noise, t), t a (B,) tensor of times in (0, T], and returns the point
of the trajectory at t, D(exp(tau(T, t) A) E(T n)) (spectral generators only: exp(tau A) of a dense generator needs
a matrix exponential, which ONNX lacks).

The exported files run without hkd: torch.export.load(path).module()(noise), or ONNX Runtime (see README.md).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from hkd import files
from hkd.errors import UserError
from hkd.model import HKDModel
from hkd.ops import reference

FORMATS = ("pt2", "onnx", "diffusers")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
ONNX_OPSET = 18
MARK = (
    "hkd-export"  # in every file export writes (a .pt2's extra file, an .onnx's doc_string): what --overwrite replaces
)


class ExportError(UserError, ValueError):
    """A model, format or option that cannot be exported; the message names it."""


def folded_evolution(model: HKDModel) -> list[tuple[Tensor, ...]]:
    """exp(tau(T, eps) A^(l)) per level, in float64: (re, im) of shape (d/2, h, w) or (d/2, 1, 1) for spectral
    generators (the pair (z[2k], z[2k+1]) is multiplied as a complex number by re + i im); (M,) with M (d, d) or
    (h*w, d, d) for dense ones. Empty when the model has no Koopman evolution (koopman=False)."""
    if not model.config.koopman:
        return []
    tau = model.tau(model.T, model.eps)
    prop = model.propagator
    with torch.no_grad():
        if prop.generator == "spectral":
            out = []
            for alpha, beta in zip(prop.alphas, prop.betas, strict=True):
                alpha, beta = alpha.detach().double().cpu(), beta.detach().double().cpu()
                if alpha.dim() == 1:
                    alpha, beta = alpha[:, None, None], beta[:, None, None]
                scale = torch.exp(alpha * tau)
                out.append((scale * torch.cos(beta * tau), scale * torch.sin(beta * tau)))
            return out
        return [(reference.expm(tau * A.detach().double().cpu()),) for A in prop.generators]


def rotate_pairs(z: Tensor, re: Tensor, im: Tensor) -> Tensor:
    """(z[2k] + i z[2k+1]) * (re + i im) for every channel pair k; re, im broadcast against (B, d/2, h, w)."""
    x, y = z.unflatten(1, (z.shape[1] // 2, 2)).unbind(2)
    return torch.stack((re * x - im * y, im * x + re * y), dim=2).flatten(1, 2)


def apply_matrix(z: Tensor, M: Tensor) -> Tensor:
    """M z at every position: M (d, d) shared, or (h*w, d, d) one per position."""
    if M.dim() == 2:
        return torch.einsum("ij,bjhw->bihw", M, z)
    flat = z.flatten(2).permute(2, 0, 1)  # (P, B, d)
    return (flat @ M.transpose(1, 2)).permute(1, 2, 0).reshape(z.shape)


class OneStepGenerator(nn.Module):
    """noise (B, C, R, R) -> x_eps = D(exp((eps - T) A) E(T noise)), the evolution folded into buffers."""

    def __init__(self, model: HKDModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        c_skip, c_out, c_in, c_noise = (float(c) for c in model.coefficients(model.T))
        self.net = copy.deepcopy(model.net).to("cpu", dtype).eval()
        for name, module in self.net.named_modules():  # the noise embedding stays float32, as hkd.unet computes it
            if name.startswith("map_") or name.endswith("affine"):
                module.float()
        self.register_buffer("label", torch.tensor([c_noise]))  # c_noise(T), broadcast over the batch
        self.input_scale = c_in * model.T  # c_in(T) T: the input is standard-normal noise
        self.output_scale = c_out
        self.skip_scale = c_skip * model.T if model.keeps_skip else 0.0  # the teacher's skip term c_skip(T) x_T
        self.generator = model.propagator.generator if model.config.koopman else None
        for level, factors in enumerate(folded_evolution(model)):
            for name, factor in zip(("re", "im") if self.generator == "spectral" else ("M",), factors, strict=True):
                self.register_buffer(f"{name}{level}", factor.to(dtype))

    def encode(self, noise: Tensor) -> list[Tensor]:
        return self.net.encode(self.input_scale * noise, self.label)

    def decode(self, latents: list[Tensor], noise: Tensor) -> Tensor:
        out = self.output_scale * self.net.decode(latents, self.label)
        return out + self.skip_scale * noise if self.skip_scale else out

    def forward(self, noise: Tensor) -> Tensor:
        latents = self.encode(noise)
        if self.generator == "spectral":
            latents = [rotate_pairs(z, getattr(self, f"re{l}"), getattr(self, f"im{l}")) for l, z in enumerate(latents)]
        elif self.generator == "dense":
            latents = [apply_matrix(z, getattr(self, f"M{l}")) for l, z in enumerate(latents)]
        return self.decode(latents, noise)


class TrajectoryGenerator(OneStepGenerator):
    """(noise (B, C, R, R), t (B,) float32) -> D(exp(tau(T, t) A) E(T noise)): the trajectory at times given as an
    input, exp(tau A) through hkd.ops.reference.spectral_propagate (plain PyTorch ops, computed in float32)."""

    def __init__(self, model: HKDModel, dtype: torch.dtype = torch.float32):
        if model.config.koopman and model.propagator.generator != "spectral":
            raise ExportError("--time-input needs spectral generators (a dense exp(tau A) needs expm, not in ONNX)")
        super().__init__(model, dtype)
        self.T, self.log_clock = model.T, model.config.clock == "log"
        if self.generator == "spectral":
            for level, (alpha, beta) in enumerate(zip(model.propagator.alphas, model.propagator.betas, strict=True)):
                self.register_buffer(f"alpha{level}", alpha.detach().to("cpu", torch.float32))
                self.register_buffer(f"beta{level}", beta.detach().to("cpu", torch.float32))

    def forward(self, noise: Tensor, t: Tensor) -> Tensor:
        latents = self.encode(noise)
        if self.generator == "spectral":
            tau = t.log() - math.log(self.T) if self.log_clock else t - self.T  # tau(T, t) = c(t) - c(T)
            levels = range(len(latents))
            alphas, betas = [getattr(self, f"alpha{l}") for l in levels], [getattr(self, f"beta{l}") for l in levels]
            latents = reference.spectral_propagate(latents, alphas, betas, tau.float())
        return self.decode(latents, noise)


def load_model(directory: str | os.PathLike) -> HKDModel:
    """HKDModel.from_pretrained(directory) on the CPU, with any failure as an ExportError naming the folder."""
    try:
        return HKDModel.from_pretrained(directory).eval()
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(f"model folder {str(directory)!r} does not load: {_one_line(error)}") from error


def export(
    model: HKDModel | str | os.PathLike,
    out: str | os.PathLike,
    format: str,
    *,
    dynamic_batch: bool = False,
    batch: int = 1,
    dtype: str = "float32",
    time_input: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export `model` (an HKDModel or a model folder) to `out` as `format` ("pt2", "onnx" or "diffusers");
    returns the path.

    The graph's input is `noise` (B, C, R, R), standard normal, in `dtype`, plus `t` (B,) with time_input; its
    output `images`. B is `batch`, or any size with dynamic_batch. "diffusers" writes the folder of an
    hkd.pipeline.HKDPipeline instead (float32; no graph options; never into an existing non-empty folder). An
    existing `out` is replaced only when it is an earlier export of the same format and `overwrite` is set (a
    folder or any other file: an ExportError first)."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    if format == "onnx" and not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript")):
        raise ExportError("--format onnx needs the onnx and onnxscript packages: pip install 'hkd[export]'")
    out = Path(out)
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent} is not a folder (the output file's folder must exist)")
    if format == "diffusers":
        if time_input or dynamic_batch or dtype != "float32" or batch != 1:
            raise ExportError(
                "--format diffusers writes a pipeline folder: --time-input, --dynamic-batch, --batch and "
                "--dtype do not apply (pipe(batch_size=...), pipe.trajectory(times), pipe.to(dtype))"
            )
        if importlib.util.find_spec("diffusers") is None:
            raise ExportError("--format diffusers needs the diffusers package: pip install 'hkd[diffusers]'")
        from hkd.pipeline import export_pipeline

        return export_pipeline(model if isinstance(model, HKDModel) else load_model(model), out)
    try:
        files.refuse_replace(out, lambda path: is_export(path, format), overwrite)
    except UserError as error:
        raise ExportError(str(error)) from None
    if not isinstance(model, HKDModel):
        model = load_model(model)
    if dynamic_batch and model.config.diffusers is not None:  # diffusers' Upsample2D: `if batch >= 64: contiguous()`
        raise ExportError(
            "--dynamic-batch: a diffusers-backed model's graph branches on the batch size; export a fixed --batch"
        )
    make = TrajectoryGenerator if time_input else OneStepGenerator
    module = make(model, DTYPES[dtype]).eval()
    # with a dynamic batch, trace at batch 2: torch.export specialises sizes 0 and 1
    size = 2 if dynamic_batch else batch
    shape = (size, model.img_channels, model.img_resolution, model.img_resolution)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DTYPES[dtype])
    inputs = (noise, torch.full((size,), model.T / 2)) if time_input else (noise,)
    return save_program(module, inputs, out, format, dynamic_batch=dynamic_batch)


def save_program(module: nn.Module, inputs: tuple[Tensor, ...], out: Path, format: str, *, dynamic_batch: bool):
    """torch.export `module` at `inputs` (axis 0 of every input dynamic with dynamic_batch) and write it as `format`,
    atomically; an op that does not export is an ExportError naming it."""
    names = ["noise", "t"][: len(inputs)]
    batch = torch.export.Dim("batch", min=1, max=2**16) if dynamic_batch else None
    shapes = {name: {0: batch} for name in names} if dynamic_batch else None
    with torch.no_grad():
        try:
            with _quiet():
                program = torch.export.export(module, inputs, dynamic_shapes=shapes, strict=False)
        except Exception as error:
            raise ExportError(f"torch.export failed: {_one_line(error)}") from error
        _check_ops(program, format)
        with files.replacing(out) as tmp:
            if format == "pt2":
                with open(tmp, "wb") as file:
                    torch.export.save(program, file, extra_files={MARK: MARK})
            else:
                _save_onnx(program, tmp, names)
    return out


def is_export(path: Path, format: str) -> bool:
    """Whether `path` is a file `export` wrote as `format` (its mark), read without inflating anything."""
    import zipfile

    try:
        if format == "pt2":
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(f"/extra/{MARK}") for name in archive.namelist())
        with open(path, "rb") as file:  # the ONNX ModelProto's doc_string (field 6) precedes its graph
            return b"\x32" + bytes([len(MARK)]) + MARK.encode() in file.read(512)
    except (OSError, zipfile.BadZipFile):
        return False


def _save_onnx(program, path: Path, names: list[str]) -> None:
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                program, input_names=names, output_names=["images"], opset_version=ONNX_OPSET, dynamo=True,
                verbose=False, optimize=True,
            )  # fmt: skip
    except Exception as error:
        raise ExportError(f"ONNX export failed: {_one_line(error)}") from error
    onnx_program.model.doc_string = MARK
    onnx_program.save(str(path))


@contextlib.contextmanager
def _quiet():
    """torch's warnings, log records and stderr prints off: an exporter's failure becomes one ExportError line."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _check_ops(program: torch.export.ExportedProgram, format: str) -> None:
    """Refuse a graph that calls ops outside core PyTorch (custom ops, higher-order ops): they have no ONNX form, and
    a .pt2 holding one runs only where its library is loaded."""
    foreign = sorted(
        {
            str(node.target)
            for node in program.graph.nodes
            if node.op == "call_function"
            and (
                isinstance(node.target, torch._ops.HigherOrderOperator)
                or (isinstance(node.target, torch._ops.OpOverload) and node.target.namespace not in ("aten", "prims"))
            )
        }
    )
    if foreign:
        raise ExportError(f"{format} export: op(s) outside core PyTorch in the graph, which do not export: {foreign}")


def _one_line(error: BaseException) -> str:
    """The error's type and first line; for torch.onnx's ConversionError, the first line of its exception summary
    (the one that names the op)."""
    text = str(error)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]

    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
