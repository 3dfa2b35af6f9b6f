"""EDM's snapshot pickles (NVlabs/edm: `edm-*.pkl`, `network-snapshot-*.pkl`), read without executing anything.

The format. A snapshot is a pickled dict: `ema` (the network), and in training snapshots `loss_fn`,
`augment_pipe` and `dataset_kwargs`. Every EDM network object is a `torch_utils.persistence` record: the pickle
calls `torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = {type, version, module_src,
class_name, state}, where module_src is the whole Python source of EDM's `training/networks.py` (which EDM's own
loader executes) and state is the module's `__dict__` (`_parameters`, `_buffers`, `_modules`, attributes,
`_init_kwargs`). Tensors are `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` over storages serialised by
`torch.storage._load_from_bytes` (a legacy torch.save blob); `torch.nn.ModuleDict` containers and numpy scalars
(e.g. skip_scale) appear as plain pickled objects.

The reader. `read_snapshot` unpickles with an allow-list: the reconstruct function maps to a stub that keeps
`class_name` and `state` and never looks at module_src; storages load through torch.load(weights_only=True);
ModuleDict becomes the same inert record; numpy scalars become Python numbers; everything else (any other
global: os.system, builtins.eval, a class from the file) is refused with an error naming it.

The rebuild. `rebuild` turns the record tree into hkd modules, with the architecture read from the tensors and
module names (not from code): EDM's DDPM++ (SongUNet with positional embedding, standard encoder and decoder,
resample filter [1, 1]) becomes an `hkd.unet.UNet` with stem_channels = model_channels, and EDM's EDM/VP/VE
preconditioning the matching hkd wrapper. Two layouts differ and are permuted on the way in: EDM's embedding is
[sin, cos] (hkd's [cos, sin]) and EDM's qkv convolution interleaves q, k, v per channel (hkd's stacks them).
NCSN++ (Fourier embedding, residual encoder, [1, 3, 3, 1] resampling) and ADM (DhariwalUNet) are refused.
map_augment (augmentation conditioning, unused at sampling) is dropped.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hkd import files
from hkd.edm import EDMPrecond, sigma_column
from hkd.errors import ConfigError, CorruptFileError, UserError, brief
from hkd.sections import finite
from hkd.unet import UNet, check_size

FORMAT = "hkd-edm-teacher"
# what unpickling arbitrary bytes raises (a truncated file, garbage, a pickle of something else)
CORRUPT = (pickle.UnpicklingError, EOFError, RuntimeError, TypeError, AttributeError, IndexError, KeyError, ValueError,
           OverflowError, MemoryError)  # fmt: skip


class EDMPickleError(CorruptFileError):
    """An EDM pickle hkd cannot use: corrupt, not an EDM snapshot, or an architecture hkd does not rebuild."""


class UnsafePickleError(EDMPickleError):
    """The pickle asks for something outside the allow-list (nothing of it was executed)."""


# ---------------------------------------------------------------------------------------------------------------
# Reading


class Record:
    """An inert stand-in for a pickled module: its class name and its state (`__dict__`), nothing callable."""

    def __init__(self, class_name: str = "", state: dict | None = None):
        self.class_name, self.state = class_name, state or {}

    def __setstate__(self, state):  # BUILD of a plainly pickled container (torch.nn.ModuleDict)
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{self.class_name} has a state of type {type(state).__name__}, not a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"Record({self.class_name})"

    @property
    def modules(self) -> dict[str, Record]:
        return {k: v for k, v in (self.state.get("_modules") or {}).items() if v is not None}

    def tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """Every parameter and buffer below this record, by dotted name (as in a state_dict)."""
        out = {}
        for group in ("_parameters", "_buffers"):
            for name, value in (self.state.get(group) or {}).items():
                if value is not None:
                    out[prefix + name] = value
        for name, child in self.modules.items():
            out |= child.tensors(f"{prefix}{name}.")
        return out


def _reconstruct_stub(meta) -> Record:
    """Replaces torch_utils.persistence._reconstruct_persistent_obj: keeps class_name and state, drops module_src."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise UnsafePickleError("a persistent-object record without a class state")
    return Record(str(meta.get("class_name")), meta["state"])


def _container(class_name: str) -> type:
    """A Record class standing in for a plainly pickled torch container (created by NEWOBJ, filled by BUILD)."""
    return type(class_name, (Record,), {"class_name": class_name, "state": {}})


def _load_storage(data: bytes):
    if not isinstance(data, bytes):
        raise UnsafePickleError("a tensor storage that is not bytes")
    blob = io.BytesIO(data)
    files.check_archive(blob, "a tensor storage", len(data))  # EDM's are legacy blobs; a zip may not inflate
    return torch.load(blob, map_location="cpu", weights_only=True)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"a tensor over a {type(storage).__name__}, not a storage")
    if not all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride)) or len(size) != len(stride):
        raise EDMPickleError("a tensor with a negative or non-integer size, stride or offset")
    elements = getattr(storage, "_untyped_storage", storage).nbytes()  # an upper bound on its elements
    if math.prod(size) > elements:  # a stride-0 view would expand a small storage into a huge tensor
        raise EDMPickleError(f"a tensor of {math.prod(size)} elements over a storage of {elements}")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, Tensor):
        raise UnsafePickleError(f"a parameter over a {type(data).__name__}, not a tensor")
    return data


class _DType:
    """numpy.dtype(code, align, copy) with its BUILD state: just enough to read a numeric scalar."""

    def __init__(self, code, align=False, copy=False):
        self.code, self.order = str(code), "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>|=":
            self.order = state[1]


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _DType) or not isinstance(data, bytes) or dtype.code[:1] not in "biuf":
        raise UnsafePickleError("a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype=np.dtype(dtype.order.replace("|", "=") + dtype.code))[0].item()


class _EasyDict(dict):
    """dnnlib.EasyDict as a plain dict (it is one, with attribute access)."""


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_stub,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("dnnlib.util", "EasyDict"): _EasyDict,
}
for _name in ("ModuleDict", "ModuleList", "Sequential"):
    _ALLOWED[("torch.nn.modules.container", _name)] = _container(_name)


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refuses {module}.{name}: not a tensor, a plain container or an EDM network record"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError("refuses a persistent id (not an EDM snapshot pickle)")


def read_snapshot(path: str | Path) -> dict[str, Any]:
    """The snapshot's top-level dict with every network as a Record; nothing from the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EDM pickle {str(path)!r} not found")
    try:
        blob = path.read_bytes()
        _check_lengths(blob)
        data = _SafeUnpickler(io.BytesIO(blob)).load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: {error}") from None
    except CORRUPT as error:
        raise EDMPickleError(f"{path} is corrupt or not an EDM snapshot pickle: {error}") from None
    if isinstance(data, Record):
        data = {"ema": data}
    if not isinstance(data, dict) or not isinstance(data.get("ema"), Record):
        raise EDMPickleError(f"{path} is not an EDM snapshot pickle (no 'ema' network)")
    return data


def _check_lengths(blob: bytes) -> None:
    """Walk the pickle's opcodes without building anything: a length field (bytes, string, long, frame) that declares
    more than the rest of the file holds is a ValueError, found before the unpickler would allocate it."""
    stream = io.BytesIO(blob)
    for opcode, _, _ in pickletools.genops(stream):
        if opcode.name == "STOP":
            return


# ---------------------------------------------------------------------------------------------------------------
# Preconditioning


class SDEPrecond(nn.Module):
    """EDM's VP and VE preconditioning (Song et al.'s SDEs) around an hkd UNet, in the EDM denoiser form:
    VP: c_in = 1/sqrt(sigma^2 + 1), c_out = -sigma, c_noise = (M - 1) t(sigma); VE: c_in = 1, c_out = sigma,
    c_noise = ln(sigma / 2); c_skip = 1 for both."""

    def __init__(self, net: nn.Module, kind: str, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000):
        super().__init__()
        if kind not in ("vp", "ve"):
            raise EDMPickleError(f"unknown preconditioning {kind!r} (vp, ve)")
        self.net, self.kind, self.beta_d, self.beta_min, self.M = net, kind, beta_d, beta_min, M

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        x = x.to(torch.float32)
        sigma = sigma_column(sigma, x)
        if self.kind == "vp":
            t = ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d
            c_in, c_out, c_noise = 1 / (sigma**2 + 1).sqrt(), -sigma, (self.M - 1) * t
        else:
            c_in, c_out, c_noise = torch.ones_like(sigma), sigma, (0.5 * sigma).log()
        return x + c_out * self.net(c_in * x, c_noise.flatten(), class_labels).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Rebuilding


def _swap_halves(n: int) -> Tensor:
    """The permutation between EDM's [sin, cos] embedding and hkd's [cos, sin] (its own inverse)."""
    return torch.cat([torch.arange(n // 2, n), torch.arange(n // 2)])


def _qkv_order(channels: int) -> Tensor:
    """Rows of EDM's qkv conv (channel c of q/k/v j at row 3c + j) in hkd's order (row j C + c)."""
    return torch.arange(3 * channels).reshape(channels, 3).t().reshape(-1)


def _architecture(model: Record, where: str) -> dict[str, Any]:
    """hkd.unet.UNet arguments from a SongUNet record's module names and tensor shapes; refuses other variants."""
    if model.class_name != "SongUNet":
        variant = "ADM (DhariwalUNet)" if model.class_name == "DhariwalUNet" else model.class_name
        raise EDMPickleError(f"{where}: the network is {variant}; hkd rebuilds EDM's DDPM++ (SongUNet) only")
    kwargs = model.state.get("_init_kwargs") or {}
    modules = model.modules
    noise = modules.get("map_noise")
    if noise is None or noise.class_name != "PositionalEmbedding":
        kind = noise.class_name if noise is not None else "none"
        raise EDMPickleError(f"{where}: noise embedding {kind}: that is NCSN++; hkd rebuilds DDPM++ (positional) only")
    enc, dec = modules["enc"].modules, modules["dec"].modules
    if any("aux" in name for name in enc) or sum("aux" in name for name in dec) != 2:
        raise EDMPickleError(f"{where}: a skip/residual encoder or skip decoder (NCSN++); hkd rebuilds DDPM++ only")
    if list(kwargs.get("resample_filter", [1, 1])) != [1, 1]:
        raise EDMPickleError(f"{where}: resample_filter {kwargs['resample_filter']}; hkd rebuilds [1, 1] only")
    model_channels = int(noise.state["num_channels"])
    if noise.state.get("max_positions", 10000) != 10000 or not noise.state.get("endpoint", False):
        raise EDMPickleError(f"{where}: a positional embedding other than DDPM++'s (10000 positions, endpoint)")
    t = model.tensors()
    emb = t["map_layer0.weight"].shape[0]
    if t["map_layer0.weight"].shape[1] != model_channels or emb != 4 * model_channels:
        raise EDMPickleError(
            f"{where}: embedding widths {tuple(t['map_layer0.weight'].shape)}; hkd needs 4 x noise width"
        )
    first = next(iter(enc))
    img_resolution = int(first.split("x")[0])
    levels: dict[int, list[str]] = {}
    for name in enc:
        levels.setdefault(int(name.split("x")[0]), []).append(name)
    channel_mult, attn, num_blocks = [], set(), None
    for res, names in levels.items():
        blocks = [n for n in names if "_block" in n]
        if num_blocks is None:
            num_blocks = len(blocks)
        if len(blocks) != num_blocks:
            raise EDMPickleError(f"{where}: {len(blocks)} blocks at {res}x{res}, {num_blocks} at {img_resolution}")
        channel_mult.append(t[f"enc.{blocks[-1]}.conv1.weight"].shape[0] // model_channels)
        attn |= {res for n in blocks if "qkv" in enc[n].modules}
    block = enc[levels[img_resolution][-1]].state
    stem = t[f"enc.{first}.weight"].shape[0]
    return dict(
        img_resolution=img_resolution,
        in_channels=t[f"enc.{first}.weight"].shape[1],
        out_channels=t[f"dec.{img_resolution}x{img_resolution}_aux_conv.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_blocks=num_blocks,
        attn_resolutions=sorted(attn, reverse=True),
        dropout=float(block.get("dropout", 0.0)),
        stem_channels=stem if stem != model_channels * channel_mult[0] else None,  # None: hkd's default width
        label_dim=t["map_label.weight"].shape[1] if "map_label.weight" in t else 0,
    )


def _hkd_name(name: str) -> str | None:
    """EDM's state-dict name (below the SongUNet) as hkd's UNet names it; None for tensors hkd does not use."""
    if name.startswith("map_augment.") or name.endswith(".resample_filter"):
        return None
    parts = name.split(".")
    if parts[0] == "dec" and parts[1].endswith(("_aux_norm", "_aux_conv")):
        return ("out_norm." if parts[1].endswith("norm") else "out_conv.") + parts[-1]
    if parts[0] == "dec":
        parts[1] = parts[1].replace("_in0", "_mid0").replace("_in1", "_mid1")
    if len(parts) == 4 and parts[2] in ("norm2", "qkv", "proj"):
        parts[2:3] = ["attention", "norm" if parts[2] == "norm2" else parts[2]]
    return ".".join(parts)


def _check_layers(model: Record, net: UNet, where: str) -> None:
    """The layer constants the tensors do not show: group counts, epsilons, skip scale, heads, adaptive scale."""
    hkd_modules = dict(net.named_modules())

    def walk(record: Record, prefix: str):
        state, name = record.state, prefix.rstrip(".")
        if record.class_name == "GroupNorm":
            ours = hkd_modules[_hkd_name(name + ".weight").rsplit(".", 1)[0]]
            if (state.get("num_groups"), state.get("eps")) != (ours.num_groups, ours.eps):
                raise EDMPickleError(f"{where}: {name} has {state.get('num_groups')} groups, eps {state.get('eps')}")
        if record.class_name == "UNetBlock":
            constants = (state.get("adaptive_scale"), state.get("num_heads") in (0, 1))
            if constants != (False, True) or abs(float(state.get("skip_scale", 1)) - math.sqrt(0.5)) > 1e-12:
                raise EDMPickleError(f"{where}: {name} is not a DDPM++ block (skip scale, heads or adaptive scale)")
        for child_name, child in record.modules.items():
            walk(child, f"{prefix}{child_name}.")

    walk(model, "")


def rebuild(ema: Record, where: str = "EDM pickle") -> tuple[nn.Module, dict[str, Any]]:
    """(denoiser, config): the EDM network `ema` as hkd modules, and the config that rebuilds it (`from_config`)."""
    precond = ema.class_name
    kinds = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
    if precond not in kinds:
        raise EDMPickleError(f"{where}: preconditioning {precond} (hkd rebuilds EDMPrecond, VPPrecond, VEPrecond)")
    model = ema.modules.get("model")
    if model is None:
        raise EDMPickleError(f"{where}: {precond} holds no 'model'")
    unet = _architecture(model, where)
    state = ema.state
    config = {"unet": unet, "precond": {"kind": kinds[precond]}}
    if precond == "EDMPrecond":
        config["precond"]["sigma_data"] = float(state.get("sigma_data", 0.5))
    if precond == "VPPrecond":
        config["precond"] |= {k: float(state.get(k, d)) for k, d in (("beta_d", 19.9), ("beta_min", 0.1), ("M", 1000))}
    tensors = model.tensors()
    found = {_hkd_name(k): tuple(v.shape) for k, v in tensors.items() if _hkd_name(k) is not None}
    with torch.device("meta"):  # the declared network against the file's tensors, before anything is allocated
        _check_shapes(from_config(config, where).net, found, where)
    denoiser = from_config(config, where)
    weights = convert_state(tensors, unet["model_channels"])
    _load(denoiser.net, weights, where)
    _check_layers(model, denoiser.net, where)
    return denoiser, config


def convert_state(edm: dict[str, Tensor], model_channels: int) -> dict[str, Tensor]:
    """A SongUNet state dict (EDM's names and layouts) as hkd UNet's."""
    out = {}
    for name, tensor in edm.items():
        ours = _hkd_name(name)
        if ours is None:
            continue
        tensor = tensor.detach().to(torch.float32).clone()
        if name == "map_layer0.weight":
            tensor = tensor[:, _swap_halves(tensor.shape[1])]
        elif name.startswith("map_label."):
            tensor = tensor[_swap_halves(tensor.shape[0])]
        elif ".qkv." in name:
            tensor = tensor[_qkv_order(tensor.shape[0] // 3)]
        out[ours] = tensor.contiguous()
    return out


def _load(net: UNet, weights: dict[str, Tensor], where: str) -> None:
    _check_shapes(net, {k: tuple(v.shape) for k, v in weights.items()}, where)
    net.load_state_dict(weights)


def _check_shapes(net: UNet, found: dict[str, tuple], where: str) -> None:
    """The weights' names and shapes `found` against the network's (which may live on the meta device)."""
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing, unexpected = sorted(set(ours) - set(found)), sorted(set(found) - set(ours))
    shapes = [f"{k} {v} != {ours[k]}" for k, v in found.items() if k in ours and v != ours[k]]
    if missing or unexpected or shapes:
        raise EDMPickleError(
            f"{where}: weights do not fit the rebuilt U-Net: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shapes {shapes[:3]}"
        )


PRECOND = {"edm": ("sigma_data",), "vp": ("beta_d", "beta_min", "M"), "ve": ()}


def from_config(config: dict[str, Any], where: str = "EDM teacher config") -> nn.Module:
    """An untrained denoiser of the architecture in `config` ({"unet": UNet arguments, "precond": {"kind", ...}}).
    Sizes above hkd.unet.LIMITS, unknown keys, non-finite or non-positive constants are ConfigErrors naming them."""
    if not isinstance(config, dict) or not isinstance(config.get("unet"), dict) or not finite(config):
        raise ConfigError(f"{where}: 'unet' must be a mapping of U-Net arguments, every number finite")
    unet, precond = dict(config["unet"]), config.get("precond")
    check_size(unet, f"{where}: unet")
    kind = precond.get("kind") if isinstance(precond, dict) else None
    if kind not in PRECOND or set(precond) - {"kind", *PRECOND[kind]}:
        raise ConfigError(f"{where}: precond must be {{kind: edm, vp or ve, and its constants}}, got {brief(precond)}")
    if not all(isinstance(v, (int, float)) and v > 0 for k, v in precond.items() if k != "kind"):
        raise ConfigError(f"{where}: the precond constants must be positive numbers, got {brief(precond)}")
    args = [unet.pop(k) for k in ("img_resolution", "in_channels", "out_channels")]
    try:
        net = UNet(*args, **{k: tuple(v) if isinstance(v, list) else v for k, v in unet.items()})
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"{where}: unet arguments do not build a U-Net ({brief(str(error), 200, plain=True)})"
        ) from None
    precond = dict(precond)
    precond.pop("kind")
    denoiser = EDMPrecond(net, **precond) if kind == "edm" else SDEPrecond(net, kind, **precond)
    denoiser.img_resolution, denoiser.img_channels, denoiser.label_dim = args[0], args[1], net.label_dim
    return denoiser


def load_edm_pickle(path: str | Path) -> nn.Module:
    """The `ema` network of an EDM snapshot pickle as an hkd denoiser D(x, sigma[, class_labels]), with `.identity`
    (source "edm-pickle", path, config)."""
    path = Path(path)
    ema = read_snapshot(path)["ema"]
    try:
        denoiser, config = rebuild(ema, str(path))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        if isinstance(error, UserError):
            raise
        raise EDMPickleError(f"{path} is not an EDM snapshot hkd can rebuild ({type(error).__name__}: "
                             f"{brief(str(error), 100, plain=True)})") from None  # fmt: skip
    denoiser.identity = {"source": "edm-pickle", "path": str(path.resolve()), "config": config}
    return denoiser


# ---------------------------------------------------------------------------------------------------------------
# Import: a pickle-free copy


def imported(directory: Path) -> bool:
    """Whether `directory` holds a teacher `import_teacher` wrote (its config.json says so)."""
    try:
        config = files.read_json(Path(directory) / files.CONFIG_NAME)
    except UserError:
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def import_teacher(path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json (format hkd-edm-teacher) from an EDM pickle. An
    earlier import in out_dir is replaced only with `overwrite`; any other file of those names is never replaced."""
    out_dir = Path(out_dir)
    names = (files.WEIGHTS_NAME, files.CONFIG_NAME)
    ours = imported(out_dir)
    for name in names:  # before any work
        files.refuse_replace(out_dir / name, lambda _: ours, overwrite, f"--out {str(out_dir)!r}:")
    denoiser = load_edm_pickle(path)
    out_dir = files.output_folder(out_dir, "--out")  # after the pickle passed its checks
    config = {"format": FORMAT, "version": 1, "source": str(Path(path).resolve()), **denoiser.identity["config"]}
    files.save_pretrained(out_dir, denoiser.net.state_dict(), config)
    return out_dir


def load_imported(directory: str | Path) -> nn.Module:
    """The teacher `import_teacher` wrote (identity source "edm-import"; same hash as the pickle it came from), read
    by hkd.files.load_pretrained: the declared network is checked against the weights before it is built."""
    directory = Path(directory)
    built = {}

    def build(config: dict[str, Any]) -> nn.Module:
        built["core"] = {"unet": config.get("unet"), "precond": config.get("precond")}
        built["denoiser"] = from_config(built["core"], str(directory / files.CONFIG_NAME))
        return built["denoiser"].net

    files.load_pretrained(directory, FORMAT, build)
    denoiser = built["denoiser"]
    denoiser.identity = {"source": "edm-import", "path": str(directory.resolve()), "config": built["core"]}
    return denoiser
