"""Test helper: EDM-format snapshot pickles written without EDM's code, and a float64 reference of EDM's DDPM++.

`songunet(...)` lays out a SongUNet (DDPM++: positional embedding, standard encoder and decoder, resample filter
[1, 1]) as EDM's `training/networks.py` constructs it: the same module names, registration order, tensor shapes and
layouts, attributes and init kwargs, with random weights. `write_snapshot` pickles it the way EDM's
`torch_utils.persistence` does: every network object becomes a call of
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = {type, version, module_src, class_name,
state}; ModuleDicts and tensors are pickled plainly. `module_src` is whatever the test plants there.

`reference_denoiser` is EDM's forward of that layout in float64, written from the description of the layers (EDM
names and layouts, resampling as a filtered convolution), independent of hkd's UNet and of hkd.edm_pickle's
renaming and permutations.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

HARMLESS_SOURCE = "# the source of training/networks.py would be here\n"


def _reconstruct_persistent_obj(meta):  # pickled by reference only; never called by the code under test
    raise AssertionError("the reconstruct function was called")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class Node:
    """One module: EDM's class name, parameters, buffers, children, attributes; pickles as EDM's would."""

    def __init__(self, class_name, params=None, buffers=None, modules=None, persistent=True, init_kwargs=None, **attrs):
        self.class_name, self.persistent, self.attrs = class_name, persistent, attrs
        self.params = OrderedDict((k, v) for k, v in (params or {}).items())
        self.buffers = OrderedDict((k, v) for k, v in (buffers or {}).items())
        self.modules = OrderedDict(modules or {})
        self.init_kwargs = init_kwargs or {}
        self.module_src = HARMLESS_SOURCE

    def state(self):
        empty = OrderedDict
        state = {
            "training": False,
            "_parameters": OrderedDict(
                (k, None if v is None else torch.nn.Parameter(v, False)) for k, v in self.params.items()
            ),
            "_buffers": OrderedDict(self.buffers),
            "_non_persistent_buffers_set": set(),
            "_backward_pre_hooks": empty(),
            "_backward_hooks": empty(),
            "_is_full_backward_hook": None,
            "_forward_hooks": empty(),
            "_forward_hooks_with_kwargs": empty(),
            "_forward_pre_hooks": empty(),
            "_state_dict_hooks": empty(),
            "_load_state_dict_pre_hooks": empty(),
            "_modules": OrderedDict((k, v.container() if v is not None else None) for k, v in self.modules.items()),
        }
        if self.persistent:
            state |= {"_init_args": (), "_init_kwargs": dict(self.init_kwargs)}
        return state | self.attrs

    def container(self):
        """What the parent holds: a persistent Node, or a real torch.nn.ModuleDict (pickled plainly, NEWOBJ of its
        class and BUILD with its __dict__) whose __dict__ is this Node's state."""
        if self.persistent:
            return self
        container = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
        container.__dict__.update(self.state())
        return container

    def __reduce_ex__(self, protocol):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state())
        return _reconstruct_persistent_obj, (meta,)

    def walk(self):
        yield self
        for child in self.modules.values():
            if child is not None:
                yield from child.walk()


@contextmanager
def _fake_persistence_module():
    """pickle writes a function by its module and name, checking it can find it there: put it there meanwhile."""
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": module})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_snapshot(path, ema: Node, module_src: str = HARMLESS_SOURCE, training: bool = True) -> None:
    """A snapshot pickle: {ema, loss_fn, augment_pipe, dataset_kwargs} (training) or {ema}, module_src planted."""
    for node in ema.walk():
        node.module_src = module_src
    data = {"ema": ema}
    if training:
        loss = Node("EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5, init_kwargs={})
        augment = Node("AugmentPipe", p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        for node in (loss, augment):
            node.module_src = module_src
        data |= {
            "loss_fn": loss,
            "augment_pipe": augment,
            "dataset_kwargs": {"path": "cifar10-32x32.zip", "xflip": False},
        }
    with _fake_persistence_module(), open(path, "wb") as file:
        pickle.dump(data, file)


# ---------------------------------------------------------------------------------------------------------------
# A SongUNet (DDPM++) laid out as EDM constructs it


def _linear(fan_in, fan_out, bias=True):
    params = {"weight": torch.randn(fan_out, fan_in) / math.sqrt(fan_in)}
    params["bias"] = 0.1 * torch.randn(fan_out) if bias else None
    return Node("Linear", params, in_features=fan_in, out_features=fan_out)


def _conv(cin, cout, kernel, up=False, down=False):
    params = {"weight": torch.randn(cout, cin, kernel, kernel) / math.sqrt(cin * kernel * kernel) if kernel else None}
    params["bias"] = 0.1 * torch.randn(cout) if kernel else None
    filt = torch.ones(1, 1, 2, 2) / 4 if up or down else None
    attrs = dict(in_channels=cin, out_channels=cout, up=up, down=down, fused_resample=False)
    return Node("Conv2d", params, {"resample_filter": filt}, **attrs)


def _norm(channels, eps=1e-6):
    params = {"weight": 1 + 0.1 * torch.randn(channels), "bias": 0.1 * torch.randn(channels)}
    return Node("GroupNorm", params, num_groups=min(32, channels // 4), eps=eps)


def _block(cin, cout, emb, up=False, down=False, attention=False, dropout=0.1):
    modules = {
        "norm0": _norm(cin),
        "conv0": _conv(cin, cout, 3, up, down),
        "affine": _linear(emb, cout),
        "norm1": _norm(cout),
        "conv1": _conv(cout, cout, 3),
        "skip": _conv(cin, cout, 1, up, down) if cin != cout or up or down else None,
    }
    if attention:
        modules |= {"norm2": _norm(cout), "qkv": _conv(cout, 3 * cout, 1), "proj": _conv(cout, cout, 1)}
    attrs = dict(in_channels=cin, out_channels=cout, emb_channels=emb, num_heads=1 if attention else 0)
    attrs |= dict(dropout=dropout, skip_scale=np.float64(np.sqrt(0.5)), adaptive_scale=False)
    return Node("UNetBlock", modules=modules, **attrs)


def songunet(img_resolution=16, in_channels=3, label_dim=0, augment_dim=0, model_channels=16, channel_mult=(2, 2),
             num_blocks=1, attn_resolutions=(8,), precond="EDMPrecond", sigma_data=0.5) -> Node:  # fmt: skip
    """An EDM `ema` network: precond around a DDPM++ SongUNet, random weights, EDM's names and layouts."""
    emb, noise = 4 * model_channels, model_channels
    maps = {
        "map_noise": Node("PositionalEmbedding", num_channels=noise, max_positions=10000, endpoint=True),
        "map_label": _linear(label_dim, noise) if label_dim else None,
        "map_augment": _linear(augment_dim, noise, bias=False) if augment_dim else None,
        "map_layer0": _linear(noise, emb),
        "map_layer1": _linear(emb, emb),
    }
    enc, cout = OrderedDict(), in_channels
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            enc[f"{res}x{res}_conv"], cout = _conv(cout, model_channels, 3), model_channels
        else:
            enc[f"{res}x{res}_down"] = _block(cout, cout, emb, down=True)
        for i in range(num_blocks):
            cin, cout = cout, model_channels * mult
            enc[f"{res}x{res}_block{i}"] = _block(cin, cout, emb, attention=res in attn_resolutions)
    skips = [block.attrs["out_channels"] for block in enc.values()]
    dec = OrderedDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            dec[f"{res}x{res}_in0"] = _block(cout, cout, emb, attention=True)
            dec[f"{res}x{res}_in1"] = _block(cout, cout, emb)
        else:
            dec[f"{res}x{res}_up"] = _block(cout, cout, emb, up=True)
        for i in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            dec[f"{res}x{res}_block{i}"] = _block(cin, cout, emb, attention=i == num_blocks and res in attn_resolutions)
        if level == 0:
            dec[f"{res}x{res}_aux_norm"] = _norm(cout)
            dec[f"{res}x{res}_aux_conv"] = _conv(cout, in_channels, 3)
    kwargs = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard")
    kwargs |= dict(channel_mult_noise=1, resample_filter=[1, 1], model_channels=model_channels)
    kwargs |= dict(channel_mult=list(channel_mult), num_blocks=num_blocks, attn_resolutions=list(attn_resolutions))
    kwargs |= dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=in_channels)
    kwargs |= dict(label_dim=label_dim, augment_dim=augment_dim, dropout=0.1)
    modules = maps | {"enc": Node("ModuleDict", modules=enc, persistent=False)}
    modules["dec"] = Node("ModuleDict", modules=dec, persistent=False)
    model = Node("SongUNet", modules=modules, label_dropout=0, init_kwargs=kwargs)
    attrs = dict(img_resolution=img_resolution, img_channels=in_channels, label_dim=label_dim, use_fp16=False)
    if precond == "EDMPrecond":
        attrs |= dict(sigma_min=0, sigma_max=float("inf"), sigma_data=sigma_data)
    if precond == "VPPrecond":
        attrs |= dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)
    if precond == "VEPrecond":
        attrs |= dict(sigma_min=0.02, sigma_max=100)
    return Node(precond, modules={"model": model}, init_kwargs={"model_type": "SongUNet"}, **attrs)


# ---------------------------------------------------------------------------------------------------------------
# EDM's forward of that layout, float64


def _w(node, name):
    return node.params[name].double()


def _ref_linear(node, x):
    y = x @ _w(node, "weight").t()
    return y if node.params.get("bias") is None else y + _w(node, "bias")


def _ref_conv(node, x):
    """Resample with the 2x2 filter (transposed convolution up, strided convolution down), then convolve."""
    channels = x.shape[1]
    if node.attrs["up"] or node.attrs["down"]:
        filt = node.buffers["resample_filter"].double().repeat(channels, 1, 1, 1)
        if node.attrs["up"]:
            x = F.conv_transpose2d(x, 4 * filt, groups=channels, stride=2)
        else:
            x = F.conv2d(x, filt, groups=channels, stride=2)
    weight = node.params.get("weight")
    if weight is None:
        return x
    x = F.conv2d(x, weight.double(), padding=weight.shape[-1] // 2)
    return x + _w(node, "bias")[None, :, None, None]


def _ref_norm(node, x):
    return F.group_norm(x, node.attrs["num_groups"], _w(node, "weight"), _w(node, "bias"), node.attrs["eps"])


def _ref_block(node, x, emb):
    m, scale = node.modules, float(node.attrs["skip_scale"])
    h = _ref_conv(m["conv0"], F.silu(_ref_norm(m["norm0"], x)))
    h = F.silu(_ref_norm(m["norm1"], h + _ref_linear(m["affine"], emb)[:, :, None, None]))
    h = _ref_conv(m["conv1"], h)
    x = (h + (_ref_conv(m["skip"], x) if m["skip"] is not None else x)) * scale
    if node.attrs["num_heads"]:
        B, C, H, W = x.shape
        qkv = _ref_conv(m["qkv"], _ref_norm(m["norm2"], x)).reshape(B, C, 3, H * W)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, C, HW): channel c of q, k, v at rows 3c, 3c+1, 3c+2
        weights = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(C), dim=2)
        x = (_ref_conv(m["proj"], torch.einsum("bqk,bck->bcq", weights, v).reshape(B, C, H, W)) + x) * scale
    return x


def reference_songunet(model: Node, x, noise_labels, class_labels=None):
    m = model.modules
    half = m["map_noise"].attrs["num_channels"] // 2
    freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float64) / (half - 1))
    angles = noise_labels.double()[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # EDM's order: sin first
    if m["map_label"] is not None:
        label_dim = m["map_label"].attrs["in_features"]
        labels = torch.zeros(1, label_dim, dtype=torch.float64) if class_labels is None else class_labels.double()
        emb = emb + _ref_linear(m["map_label"], labels * math.sqrt(label_dim))
    emb = F.silu(_ref_linear(m["map_layer1"], F.silu(_ref_linear(m["map_layer0"], emb))))
    skips = []
    for block in m["enc"].modules.values():
        x = _ref_block(block, x, emb) if block.class_name == "UNetBlock" else _ref_conv(block, x)
        skips.append(x)
    out = None
    for name, block in m["dec"].modules.items():
        if name.endswith("aux_norm"):
            out = _ref_norm(block, x)
        elif name.endswith("aux_conv"):
            out = _ref_conv(block, F.silu(out))
        else:
            if x.shape[1] != block.attrs["in_channels"]:
                x = torch.cat([x, skips.pop()], dim=1)
            x = _ref_block(block, x, emb)
    return out


def reference_denoiser(ema: Node, x, sigma, class_labels=None):
    """EDM's D(x; sigma) for an EDMPrecond, VPPrecond or VEPrecond Node: the preconditioning coefficients in
    float32 from a float32 sigma (as EDM computes them), everything else in float64."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
    a = ema.attrs
    if ema.class_name == "EDMPrecond":
        sd = a["sigma_data"]
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.log() / 4
    elif ema.class_name == "VPPrecond":
        t = ((a["beta_min"] ** 2 + 2 * a["beta_d"] * (1 + sigma**2).log()).sqrt() - a["beta_min"]) / a["beta_d"]
        c_skip, c_out, c_in, c_noise = torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (a["M"] - 1) * t
    else:
        c_skip, c_out, c_in, c_noise = torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()
    c_skip, c_out, c_in, c_noise = (c.double() for c in (c_skip, c_out, c_in, c_noise))
    x = x.double()
    return c_skip * x + c_out * reference_songunet(ema.modules["model"], c_in * x, c_noise.flatten(), class_labels)
