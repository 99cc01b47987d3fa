"""``gmmhet``: the engine's command line. One sub-command per module in ``commands/``.

Each command module has a docstring (its ``--help`` text), ``add_args(parser)`` and
``main(args)``. Bad input ends in a one-line ``gmmhet: error: ...`` and exit status 2,
with no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from .errors import InputError

COMMANDS = ["simulate", "convert", "build", "train", "eval", "analyze", "reconstruct", "refine", "refine-domain"]

DESCRIPTION = """\
gmmhet: conformational and compositional heterogeneity of cryo-EM particles with a Gaussian
mixture model decoded from a per-particle latent vector (e2gmm's method), on PyTorch."""

EPILOG = """\
a typical run (maps in Angstrom, particles with poses and CTF in a RELION star):
  gmmhet build --map consensus.mrc --resolution 8 -o gmm
  gmmhet train --particles particles.star --gmm gmm --zdim 4 --epochs 30 -o train
  gmmhet analyze --train train --particles particles.star --clusters 4 -o analysis
  gmmhet reconstruct --particles particles.star --indices analysis/cluster_00_rows.txt -o class00.mrc
  gmmhet eval --train train --z 0.5,0,0,0 -o state.mrc

Every command takes -o/--out and --threads N (CPU threads; on a machine shared with other
jobs give fewer than its cores, e.g. --threads 1: torch's default of one per core can run many
times slower when a core is busy); all but convert take --device (cpu, cuda, cuda:N, a GPU
number N, or auto = cuda when available; default auto). 'gmmhet COMMAND --help' documents each
command."""

DEVICE_HELP = "torch device: cpu, cuda, cuda:N, a GPU number N, or auto (default auto: cuda when available)"
THREADS_HELP = ("CPU threads for torch (default 0: torch's default, one per core; on a machine shared with other "
                "jobs give fewer, e.g. 1)")

# one latent point: '--z -1,0,0,0' and cryoDRGN's '--z -1 0 0 0' both become '--z=-1,0,0,0'
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def normalise_argv(argv: list[str]) -> list[str]:
    """Joins the numbers after ``--z`` (space- or comma-separated, negative ones included) into
    ``--z=Z1,...,ZK``, which argparse would otherwise read as options."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--z":
            j, parts = i + 1, []
            while j < len(argv) and all(_NUMBER.match(v) for v in argv[j].split(",") if v != "") \
                    and argv[j].strip(","):
                parts.append(argv[j].strip(","))
                j += 1
            if parts:
                out.append("--z=" + ",".join(parts))
                i = j
                continue
        out.append(argv[i])
        i += 1
    return out


def _common_options(p: argparse.ArgumentParser) -> None:
    """One convention for every command: ``-o`` for ``--out`` and ``--device`` defaulting to auto."""
    for action in p._actions:
        if "--out" in action.option_strings and "-o" not in p._option_string_actions:
            action.option_strings.insert(0, "-o")
            p._option_string_actions["-o"] = action
        if action.dest == "device":
            action.default = "auto"
            action.help = DEVICE_HELP
    if "--threads" not in p._option_string_actions:
        p.add_argument("--threads", type=int, default=0, metavar="N", help=THREADS_HELP)


def _load(name: str):
    return importlib.import_module(f"scipion_gmmhet.engine.commands.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmmhet", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"gmmhet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"scipion_gmmhet.engine.commands.{name.replace('-', '_')}":
                raise
            continue
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else name, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        _common_options(p)
        p.set_defaults(_main=module.main)
    return parser


def _set_threads(n: int) -> None:
    """``--threads N`` (N >= 1) sets torch's intra-op threads; 0 keeps torch's default. Logged
    with the load average, which says when a shared machine is busy."""
    import os

    import torch
    if n < 0:
        raise InputError(f"--threads {n}: give 0 (torch's default) or a number of threads >= 1")
    if n:
        torch.set_num_threads(n)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    logging.getLogger("scipion_gmmhet").info("CPU threads: %d of %d cores (load average %.2f)%s",
                                             torch.get_num_threads(), os.cpu_count() or 0, load,
                                             "" if n or load < 0.5 * (os.cpu_count() or 1) else
                                             "; the machine is busy: --threads 1 may be much faster")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(normalise_argv(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    try:
        _set_threads(args.threads)
        device = getattr(args, "device", None)
        # 'auto' stays for the commands that pick per process (torchrun) or record it
        if device is not None and (device != "auto" or args.command not in ("train", "refine", "refine-domain")):
            from .device import resolve_device
            args.device = str(resolve_device(device))  # '0' -> 'cuda:0'; a bad value: one line
        rc = args._main(args)
    except InputError as exc:
        print(f"gmmhet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder that cannot be read or written: one line, no traceback
        if not exc.filename:
            raise
        print(f"gmmhet {args.command}: error: {exc.filename}: {exc.strerror or type(exc).__name__}; check the "
              "path and its permissions", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
