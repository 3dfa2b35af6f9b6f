"""The `hkd` command. Thin: every subcommand parses its options and calls the module that does the work."""

from __future__ import annotations

import argparse
import sys

import hkd


class UserError(Exception):
    """A mistake of the user's (missing file, wrong option): reported as one line, exit code 2."""


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
        lines.append(f"extension hkd._C: built, CUDA kernels {'yes' if _C.WITH_CUDA else 'no'} (archs {archs})")
    else:
        lines.append("extension hkd._C: not built (only the reference backend is available)")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        usable = [b for b in _backend.BACKENDS if _backend.usable(b, torch.device(device))]
        auto = _backend.resolve("auto", torch.device(device))
        lines.append(f"backends usable on {device}: {', '.join(usable)} (auto -> {auto})")
    print("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hkd", description="Hierarchical Koopman Diffusion: train, generate, analyse")
    parser.add_argument("--version", action="version", version=f"hkd {hkd.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("info", help="versions, and which propagation backends are built and usable here")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, FileNotFoundError) as error:
        print(f"hkd {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
