"""The `hkd` command. Each command is a pair: parser_X adds its options (the groups several commands share are
defined once, below), and cmd_X, beside it, checks what the options name and calls the module that does the work.
build_parser assembles the pairs. The modules that do the work are imported inside the functions that use
them, so `hkd --help` loads only the package itself (its model and torch)."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

import hkd
from hkd.errors import RunStopped, UserError

# OS errors that are the environment's, not a bug: reported as one line with exit code 2
ENVIRONMENT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EADDRINUSE)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`hkd COMMAND: error: ...`, exit code 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def count(minimum: int = 1, maximum: int = 2**31 - 1):
    """An argparse type: an integer in [minimum, maximum] (the maximum keeps a typo from allocating terabytes)."""

    def parse(text: str) -> int:
        try:
            value = int(text) if len(text) <= 30 else None
        except ValueError:
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"{text[:30]!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum} (hkd's limit), got {value}")
        return value

    parse.__name__ = f"integer in [{minimum}, {maximum}]"
    return parse


seed = count(0, 2**63 - 1)  # an argparse type: a noise seed (numpy and torch take 64-bit seeds)
MAX_SAMPLES = 100_000  # --num of the commands that hold every sample in memory


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free port) to 65535."""
    value = count(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535, got {value}")
    return value


def fractions(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated numbers in [0, 1]."""
    try:
        values = tuple(float(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(0 <= r <= 1 for r in values):
        raise argparse.ArgumentTypeError(f"every ratio must be in [0, 1], got {text}")
    return values


def _out(path: str, what: str = "--out"):
    from hkd.files import output_folder

    return output_folder(path, what)


# -- options shared by several commands ------------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda")
TEACHERS = "teacher.pt or its folder, an EDM .pkl or import-teacher folder, or a diffusers folder"  # load_teacher's


def _device_option(p: argparse.ArgumentParser, help: str = "where to run (default: the GPU if any)") -> None:
    p.add_argument("--device", choices=DEVICES, default="auto", help=help)


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HKD model folder (save_pretrained: config.json + model.safetensors)")


def _teacher_option(p: argparse.ArgumentParser, role: str = "the teacher", required: bool = False) -> None:
    p.add_argument("--teacher", required=required, help=f"{role} ({TEACHERS})")


def _config_options(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--config", default="digits", help="config name or YAML path (default digits)")
    p.add_argument("overrides", nargs="*", help=f"config overrides a.b=value, e.g. {example}")


def _out_option(p: argparse.ArgumentParser, help: str, default=None, required=False, replaces: str = "") -> None:
    """--out, where the command writes; with `replaces` (what an earlier run wrote there), also --overwrite."""
    p.add_argument("--out", default=default, required=required, help=help)
    if replaces:
        p.add_argument("--overwrite", action="store_true", help=f"replace {replaces}")


def _fid_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception-weights", help="torch-fidelity Inception-v3 weights file: adds FID")
    p.add_argument("--reference", help="FID reference: an .npz of statistics (hkd fid-ref, or EDM's fid.py ref), "
                   "an image folder, or a config whose data section names the dataset (e.g. cifar10)")  # fmt: skip


# -- the commands: each one's parser_* (its options) beside its cmd_* (what it runs) --------------------------------


def parser_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions, and which propagation backends are built and usable here")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> None:
    import platform

    import torch

    from hkd.ops import _backend

    lines = [
        f"hkd {hkd.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
    ]
    if _backend.triton_installed():
        import triton

        lines.append(f"triton {triton.__version__}{' (interpreter)' if _backend.triton_interpreted() else ''}")
    else:
        lines.append("triton: not installed")
    if _backend.extension_loaded():
        from hkd import _C

        archs = _C.CUDA_ARCHITECTURES or "-"
        built = _backend.build_info()
        against = f", built against torch {built['torch']}, loads on torch >= {built['torch_min']}" if built else ""
        kernels = "yes" if _C.WITH_CUDA else "no"
        lines.append(f"extension hkd._C: built, CUDA kernels {kernels} (archs {archs}){against}")
    elif _backend.extension_error():
        lines.append(f"extension hkd._C: FAILED TO LOAD. {_backend.extension_error()}")
    else:
        lines.append("extension hkd._C: not built (only the reference backend is available)")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        usable = [b for b in _backend.BACKENDS if _backend.usable(b, torch.device(device))]
        auto = _backend.resolve("auto", torch.device(device))
        lines.append(f"backends usable on {device}: {', '.join(usable)} (auto -> {auto})")
    print("\n".join(lines))


# -- evaluation, analysis, editing, ablation -----------------------------------------------------------------


def _device(name: str):
    from hkd.config import choose_device

    return choose_device(name, "--device")


def _model(path: str, device):
    from hkd.model import HKDModel

    return HKDModel.from_pretrained(path).to(device).eval()


def _teacher(path: str, device):
    from hkd.teacher import load_teacher

    return load_teacher(path, device)


def _print_written(paths) -> None:
    for path in paths:
        print(f"wrote {path}")


def parser_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="table: teacher at 35 and few evaluations, HKD one step, one-step baseline")
    _model_option(p)
    _teacher_option(p, required=True)
    p.add_argument("--baseline", help="direct one-step regression model folder (model.koopman=false, "
                   "train.consistency=false; `hkd ablate` trains it as 'direct regression')")  # fmt: skip
    p.add_argument("--num", type=count(2, MAX_SAMPLES), default=500, help="samples per row (default 500)")
    p.add_argument(
        "--few-steps", type=count(1, 1000), default=3, help="Euler steps (= evaluations) of the cheap teacher row"
    )
    _fid_options(p)
    p.add_argument("--lpips-weights", help="torchvision AlexNet ImageNet weights file: adds LPIPS to the teacher "
                   "fidelity (needs pip install 'hkd[lpips]')")  # fmt: skip
    p.add_argument("--seed", type=seed, default=0, help="noise seed (the same noise for every row)")
    _out_option(p, "folder for eval.md and eval.json", default="runs/eval")
    _device_option(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    from hkd import evaluation

    device = _device(args.device)
    model, teacher = _model(args.model, device), _teacher(args.teacher, device)
    baseline = _model(args.baseline, device) if args.baseline else None
    reference = _fid_reference(args, model)
    _out(args.out)  # after every check of the inputs: a refused run creates nothing
    rows, written = evaluation.evaluate(
        model, teacher, baseline=baseline, num=args.num, seed=args.seed, few_steps=args.few_steps,
        inception_weights=args.inception_weights, lpips_weights=args.lpips_weights, out_dir=args.out,
        reference=reference,
    )  # fmt: skip
    print(written[0].read_text())
    _print_written(written)


def parser_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="spectral analysis: eigenvalues, band decodes, cumulative effect, spectra")
    _model_option(p)
    p.add_argument("--num", type=count(1, 10_000), default=8, help="samples to decode per band (default 8)")
    p.add_argument("--times", type=count(2, 1000), default=12, help="times from T to eps for the cumulative effect")
    p.add_argument("--seed", type=seed, default=0, help="noise seed")
    _out_option(p, "folder for the figures, analysis.md and analysis.json", default="runs/analysis")
    _device_option(p)
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> None:
    import torch

    from hkd import analysis

    model = _model(args.model, _device(args.device))
    _out(args.out)  # after the model is read: a refused run creates nothing
    shape = (args.num, model.img_channels, model.img_resolution, model.img_resolution)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    summary = analysis.analyze(model, noise.to(next(model.parameters()).device), args.out, num_times=args.times)
    _print_written(summary["written"])


def parser_edit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="frequency-targeted editing (grid over r), all-band baseline, inpainting")
    _model_option(p)
    p.add_argument("--band", choices=("low", "middle", "high"), default="high", help="band to swap (default high)")
    p.add_argument("--region", choices=("lower", "upper", "left", "right", "all"), default="lower",
                   help="spatial region whose components are swapped (default lower half)")  # fmt: skip
    p.add_argument(
        "--ratios", type=fractions, default="0,0.1,0.3,0.5,0.7,0.9", help="fractions r of the components to swap"
    )
    p.add_argument("--t-edit", type=float, help="time of the edit (default: the trajectory midpoint)")
    p.add_argument("--known", help="known images for inpainting (and colourisation): digits, none, an image "
                   "folder, or a config whose data section names them (default: digits for 1-channel models, "
                   "else none)")  # fmt: skip
    p.add_argument("--steps", type=count(1, 1000), default=4, help="blending steps along the trajectory for inpainting")
    p.add_argument("--num", type=count(1, 1000), default=4, help="images per figure (default 4)")
    p.add_argument("--seed", type=seed, default=0, help="noise seed")
    _out_option(p, "folder for the figures and edit.json", default="runs/edit")
    _device_option(p)
    p.set_defaults(func=cmd_edit)


def cmd_edit(args: argparse.Namespace) -> None:
    from hkd import editing

    model = _model(args.model, _device(args.device))
    if args.t_edit is not None and not model.eps <= args.t_edit <= model.T:
        raise UserError(f"--t-edit must lie in [eps, T] = [{model.eps}, {model.T}] for this model, got {args.t_edit}")
    known = None
    source = args.known or ("digits" if model.img_channels == 1 else "none")
    if source == "digits":
        from hkd.data import digits

        known = digits.load(size=model.img_resolution)[0][args.seed :: 97][: args.num]
        if known.shape[1] != model.img_channels:
            raise UserError(f"--known digits: the model makes {model.img_channels}-channel images")
    elif source != "none":
        known = _known_images(source, model, args.num, args.seed)
    _out(args.out)  # after every check of the inputs: a refused run creates nothing
    written = editing.run(
        model, args.out, num=args.num, ratios=args.ratios, band=args.band, region=args.region, t_edit=args.t_edit,
        known=known, steps=args.steps, seed=args.seed,
    )  # fmt: skip
    _print_written(written)


def _known_images(source: str, model, num: int, seed: int):
    """num images (every 97th from index seed) of an image folder or of a config's dataset, at the model's size."""
    import torch

    from hkd.data import images_from

    try:
        dataset = images_from(source, model.img_resolution, model.img_channels)
    except ValueError as error:
        raise UserError(f"--known {source}: {error}") from error
    indices = list(range(seed % len(dataset), len(dataset), 97))[:num] or list(range(min(num, len(dataset))))
    return torch.stack([dataset[i] for i in indices])


def parser_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="train and evaluate the paper's four ablation configurations, equal budgets")
    _config_options(p, "train.epochs=20 (applied to all four runs)")
    _teacher_option(p, "the teacher whose trajectories the store holds, default train.teacher")
    p.add_argument("--num", type=count(2, MAX_SAMPLES), default=500, help="evaluation samples (default 500)")
    p.add_argument("--seed", type=seed, default=0, help="evaluation noise seed")
    _out_option(p, "folder for the four runs and ablation.md/json", default="runs/ablation")
    _fid_options(p)
    _device_option(p)
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> None:
    from hkd import experiments

    cfg = _config(args)
    teacher_path = args.teacher or cfg.train.teacher
    if not teacher_path:
        raise UserError("--teacher is needed (or train.teacher in the config): the ablation evaluates against it")
    teacher = _teacher(teacher_path, _device(args.device))
    reference = _fid_reference(args, teacher)
    _out(args.out)  # after every check of the inputs: a refused run creates nothing
    rows, written = experiments.ablate(
        cfg, teacher, out_dir=args.out, num=args.num, seed=args.seed, reference=reference,
        inception_weights=args.inception_weights,
    )  # fmt: skip
    print(written[0].read_text())
    _print_written(written)


# -- generation ---------------------------------------------------------------------------------------------


def parser_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="one-step samples of a trained HKD model (PNG grid and files, optional .npz)")
    _model_option(p)
    p.add_argument("--num", type=count(1, MAX_SAMPLES), default=64, help="number of samples (default 64)")
    _out_option(p, "output folder", required=True)
    p.add_argument(
        "--trajectory", type=count(0, 100), default=0, metavar="K", help="also K states from T to eps per sample"
    )
    p.add_argument("--npz", action="store_true", help="also samples.npz (float32 arrays)")
    p.add_argument("--seed", type=seed, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=count(1, 65536), default=256, help="samples per forward pass (default 256)")
    _device_option(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> None:
    from hkd.files import output_folder
    from hkd.model import generate_to

    if args.trajectory == 1:
        raise UserError("--trajectory K needs K >= 2 (the states at T and at eps), or 0 for none")
    output_folder(args.out, "--out", create=False)  # made by generate_to, once the model is read
    model = _model(args.model, _device(args.device))
    written = generate_to(
        model, args.out, args.num, seed=args.seed, trajectory=args.trajectory, npz=args.npz, batch_size=args.batch_size
    )
    _print_written(written)


# -- teacher and trajectories -------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> dict:
    from hkd import config

    return config.load(args.config, args.overrides)


def parser_train_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-teacher", help="train an EDM teacher (default: the embedded digits)")
    _config_options(p, "teacher.steps=500")
    _out_option(p, "folder for teacher.pt and samples.png", default="runs/teacher")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its teacher.pt")
    _device_option(p)
    p.set_defaults(func=cmd_train_teacher)


def cmd_train_teacher(args: argparse.Namespace) -> None:
    from hkd.files import run_lock
    from hkd.teacher import train_teacher

    config, device = _config(args), _device(args.device)
    with run_lock(_out(args.out)):
        result = train_teacher(config.data, config.teacher, args.out, resume=args.resume, device=device)
    print(f"wrote {result['checkpoint']} (step {result['step']})")


def parser_trajectories(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trajectories", help="write (or resume, or --verify) a sharded store of teacher trajectories")
    _teacher_option(p)
    _out_option(p, "store folder (an unfinished store there is completed)")
    p.add_argument("--num", type=count(1), help="number of trajectories (trajectories.num_trajectories)")
    _config_options(p, "trajectories.shard_size=500")
    p.add_argument(
        "--workers", type=count(1, 256), default=1, help="local worker processes (CPU); torchrun ranks add up"
    )
    p.add_argument(
        "--max-shards", type=count(1), help="stop after this many new shards per worker (run again to go on)"
    )
    p.add_argument("--verify", metavar="DIR", help="check every shard of the store DIR against its manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _device_option(p)
    p.set_defaults(func=cmd_trajectories)


def cmd_trajectories(args: argparse.Namespace) -> None:
    import dataclasses
    import os

    import torch

    from hkd import trajectories
    from hkd.files import output_folder

    if args.verify:
        problems = trajectories.verify_store(args.verify)
        for line in problems:
            print(line)
        if problems:
            raise UserError(f"{args.verify}: {len(problems)} shard(s) with problems")
        manifest = trajectories.read_manifest(args.verify)
        print(f"{args.verify}: {manifest['num_shards']} shards, {manifest['num_trajectories']} trajectories, intact")
        return
    if not args.teacher or not args.out:
        raise UserError("--teacher and --out are required (or --verify DIR)")
    cfg = _config(args).trajectories
    if args.num is not None:
        cfg = dataclasses.replace(cfg, num_trajectories=args.num)
    device = _device(args.device)
    if args.workers > 1 and device.type != "cpu":
        raise UserError("--workers > 1 runs local processes on the CPU; for several GPUs use torchrun")
    output_folder(args.out, "--out", create=False)  # made by write_store, once the teacher is read
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    teacher = _teacher(args.teacher, device)
    manifest = trajectories.write_store(
        teacher, args.out, cfg, workers=args.workers, device=device, max_shards=args.max_shards,
        progress=not args.quiet,
    )  # fmt: skip
    done, size = len(manifest["shards"]), manifest["bytes_per_trajectory"]
    print(f"{args.out}: {done} of {manifest['num_shards']} shards finished ({size} bytes per trajectory)")


# -- training HKD --------------------------------------------------------------------------------------------


def parser_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train HKD on a trajectory store (Algorithm 1); torchrun for several GPUs")
    _config_options(p, "train.store=DIR train.batch=128")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out from its checkpoint.pt")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> None:
    from hkd.train import train

    result = train(_config(args), resume=args.resume)
    if result["rank"] == 0:
        print(f"wrote {result['checkpoint']} (step {result['step']})")


def parser_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on embedded data (digits, or --config photos): teacher, trajectories, HKD, eval, "
        "analysis, edit, report",
        description="Train an EDM teacher on the embedded digits (or, with --config photos, patches of scikit-image's "
        "colour photographs), write its trajectories, train HKD and the one-step baseline, evaluate, analyse the "
        "spectrum, edit, and write OUT/report.md. Finished stages are skipped on a re-run. About 15 minutes on 2 CPU "
        "cores (--quick: under a minute; --quality: about 70 minutes); photos: the ablation too, estimated 20 minutes.",
    )
    _out_option(p, "folder for every stage and the report (default: runs/demo)", default="runs/demo")
    p.add_argument(
        "--config", choices=("digits", "photos"), default="digits",
        help="the embedded data: digits (scikit-learn's) or photos (scikit-image's colour photographs, hkd[photos])",
    )  # fmt: skip
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="a smoke run of every stage at toy scale")
    scale.add_argument(
        "--quality", action="store_true", help="HKD and the baseline 3x longer, and the paper's ablation at that budget"
    )
    p.add_argument(
        "--fresh", action="store_true", help="delete OUT (a folder an earlier demo made) and redo every stage"
    )
    _device_option(p, "auto (GPU when there is one), cpu or cuda")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=20")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from hkd import demo

    scale = {"quick": args.quick, "quality": args.quality}
    report = demo.run(
        args.out, **scale, fresh=args.fresh, device=args.device, overrides=args.overrides, config=args.config
    )
    print(f"wrote {report} (open it in any Markdown viewer)")


def parser_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time the fused ops against their baselines (copy floor, torch.compile, torch.linalg.matrix_exp)",
        description="Every usable backend of the fused ops side by side with its baseline, as ratios, in one run. "
        "spectral: workload W (B x three levels of 256 channels at 32x32, 16x16, 8x8, per-position "
        "generators, per-sample tau) against the copy floor and torch.compile of the composite, forward and forward + "
        "backward. dense: dense_propagate with per-sample tau against the better plain-PyTorch composite, and expm "
        "against torch.linalg.matrix_exp. Workloads and rows are described in hkd/bench.py.",
    )
    p.add_argument("op", nargs="?", choices=("spectral", "dense", "all"), default="all", help="which op (default all)")
    p.add_argument(
        "--batch", type=count(1, 4096), nargs="+", default=[64, 128], help="spectral batch sizes (default 64 128)"
    )
    p.add_argument(
        "--repeats", type=count(0, 10_000), default=0, help="timed rounds per row (default 15 spectral, 5 dense)"
    )
    p.add_argument("--threads", type=count(0, 1024), default=0, help="CPU threads (default: torch's default)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline of the spectral op")
    _device_option(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from hkd import bench

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.op in ("spectral", "all"):
        bench.bench_spectral(args.batch, device, repeats=args.repeats or 15, compile=not args.no_compile)
    if args.op in ("dense", "all"):
        bench.bench_dense(device, repeats=args.repeats or 5)


def parser_explore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explore", help="a local web app: the trajectory, bands, edits and the teacher in the browser")
    p.add_argument("--model", help="HKD model folder (default: the demo's, runs/demo/hkd/model)")
    _teacher_option(p, "also show the teacher's Heun trajectory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=7860, help="port (default 7860; 0: any free port)")
    _device_option(p)
    p.set_defaults(func=cmd_explore)


def cmd_explore(args: argparse.Namespace) -> None:
    from hkd import explore

    device = _device(args.device)
    path = explore.default_model(args.model)
    model = _model(str(path), device)
    teacher = _teacher(args.teacher, device) if args.teacher else None
    try:
        explorer = explore.Explorer(model, teacher)
        explore.serve(explorer, args.host, args.port, name=str(path))
    except (ValueError, OSError) as error:
        raise UserError(str(error)) from error


# -- EDM checkpoints and FID reference statistics -------------------------------------------------------------------


def _fid_reference(args: argparse.Namespace, model):
    """FID reference statistics for `model`'s images from --reference (checked before any sampling); None for the
    embedded digits without --reference and --inception-weights (their offline metrics need no FID)."""
    from hkd import metrics

    digits = (model.img_channels, model.img_resolution) == (1, 16)
    if args.reference is None:
        if digits and args.inception_weights is None:
            return None
        raise UserError(
            "FID needs --reference: an .npz of reference statistics (hkd fid-ref), an image folder or a config"
        )
    network = metrics.inception(args.inception_weights)  # a missing or foreign weights file: refused before sampling
    features = getattr(network, "features", None)  # statistics of another size: refused before sampling too
    try:
        return metrics.reference_for(
            args.reference, model.img_resolution, model.img_channels, args.inception_weights, features
        )
    except ValueError as error:
        raise UserError(f"--reference {args.reference}: {error}") from error


def parser_fid_ref(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fid-ref",
        help="FID reference statistics (mu, sigma as .npz, the format of EDM's fid.py ref) of a dataset",
        description="Inception-v3 (torch-fidelity's FID network, weights from a local file) statistics of every image "
        "of SOURCE, quantised to uint8 as EDM does. SOURCE: a config (name or YAML path) whose data section names the "
        "dataset, e.g. cifar10, or an image folder.",
    )
    p.add_argument("source", help="a config (its data section) or an image folder")
    _out_option(p, "the .npz to write", required=True, replaces="an earlier fid-ref output at --out")
    p.add_argument("--resolution", type=count(1, 8192), default=32, help="image size (for a folder; default 32)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="for a folder (default 3)")
    p.add_argument("--inception-weights", help="the weights file (default $HKD_INCEPTION_WEIGHTS or the hub cache)")
    p.set_defaults(func=cmd_fid_ref)


def cmd_fid_ref(args: argparse.Namespace) -> None:
    from hkd import metrics

    if not args.out.endswith(".npz") or Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: the statistics are written as an .npz file (e.g. --out cifar10-ref.npz)")
    from hkd.files import refuse_replace

    refuse_replace(args.out, metrics.is_stats_file, args.overwrite)
    metrics.inception(args.inception_weights)  # the weights, then the place to write, before any work
    _out(str(Path(args.out).parent), "--out's folder")
    try:
        stats = metrics.reference_for(args.source, args.resolution, args.channels, args.inception_weights)
    except ValueError as error:
        raise UserError(f"{args.source}: {error}") from error
    print(f"wrote {metrics.save_stats(args.out, *stats)}")


def parser_import_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-teacher",
        help="an EDM snapshot .pkl as a pickle-free teacher folder (model.safetensors + config.json)",
        description="Read an EDM snapshot pickle (edm-*.pkl, network-snapshot-*.pkl) without executing anything in it "
        "and write its EMA network as a teacher folder that every --teacher option accepts. DDPM++ (SongUNet) "
        "networks with EDM, VP or VE preconditioning, unconditional or class-conditional.",
    )
    p.add_argument("pkl", help="the EDM snapshot pickle")
    _out_option(p, "the folder to write", required=True, replaces="an earlier import-teacher output in --out")
    p.set_defaults(func=cmd_import_teacher)


def cmd_import_teacher(args: argparse.Namespace) -> None:
    from hkd import edm_pickle

    # refused (unsafe), corrupt, not DDPM++, or an --out it may not replace: a UserError
    out = edm_pickle.import_teacher(args.pkl, args.out, args.overwrite)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'} (use the folder as --teacher)")


# -- export ----------------------------------------------------------------------------------------------------------


def parser_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="the one-step generator (noise -> image) as a .pt2 (torch.export) or .onnx file, no hkd needed to run it",
        description="Export x = D(exp((eps - T) A) E(T n)) for standard-normal noise n, exp(tau A) folded into "
        "constants: the graph holds only standard ops. Input 'noise' (B, C, R, R), output 'images' (the teacher's "
        "denoised-image space, about [-1, 1]). Load a .pt2 with torch.export.load(FILE).module(); run a .onnx with "
        "ONNX Runtime (needs pip install 'hkd[export]' to write).",
    )
    _model_option(p)
    p.add_argument("--format", required=True, metavar="{pt2,onnx,diffusers}",
                   help="pt2 (torch.export), onnx, or diffusers (an HKDPipeline folder, see hkd.pipeline)")  # fmt: skip
    _out_option(p, "output file, or new folder for diffusers (its parent must exist)", required=True,
                replaces="an earlier export of this format at --out")  # fmt: skip
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: a fixed batch, --batch)")
    p.add_argument(
        "--batch", type=count(1, 2**16), default=1, help="the fixed batch size without --dynamic-batch (default 1)"
    )
    p.add_argument("--dtype", default="float32", metavar="{float32,float16}", help="weights and I/O (default float32)")
    p.add_argument("--time-input", action="store_true", help="also take t (B,) float32 in (0, T]: the trajectory "
                   "at t instead of the endpoint (spectral generators)")  # fmt: skip
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    from hkd.export import export

    path = export(
        args.model,
        args.out,
        args.format,
        dynamic_batch=args.dynamic_batch,
        batch=args.batch,
        dtype=args.dtype,
        time_input=args.time_input,
        overwrite=args.overwrite,
    )  # fmt: skip (an ExportError is a UserError: one line, exit 2)
    print(f"wrote {path}")


# every command, in the order of `hkd --help`
COMMANDS = (
    parser_info, parser_demo, parser_eval, parser_analyze, parser_edit, parser_ablate, parser_generate,
    parser_train_teacher, parser_trajectories, parser_train, parser_bench, parser_explore, parser_import_teacher,
    parser_fid_ref, parser_export,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The `hkd` parser: each command's subparser comes from its parser_* function, in the order of COMMANDS."""
    parser = Parser(prog="hkd", description="Hierarchical Koopman Diffusion: train, generate, analyse")
    parser.add_argument("--version", action="version", version=f"hkd {hkd.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A UserError (or a missing file, or a full, read-only or forbidden place) is one line on
    stderr and exit code 2; a run stopped by a signal exits 128 + its number; anything else is a bug and keeps its
    traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, FileNotFoundError) as error:
        return _fail(args, str(error))
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRORS:
            raise
        return _fail(args, f"{error.strerror}: {error.filename}" if error.filename else str(error))
    except RunStopped as stop:
        from hkd.files import RESUME_HINT

        message = str(stop)
        if not hasattr(args, "resume"):  # demo, ablate: they resume a run when the same command runs again
            message = message.replace(RESUME_HINT, "run the same command again to continue (finished work is kept)")
        print(f"hkd {args.command}: {message}", file=sys.stderr)
        return stop.exit_code
    return 0


def _fail(args: argparse.Namespace, message: str) -> int:
    print(f"hkd {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
