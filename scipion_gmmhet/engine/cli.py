"""``gmmhet``: the engine's command line. One sub-command per module in ``commands/``.

Each command module has a docstring (its ``--help`` text), ``add_args(parser)`` and
``main(args)``. Bad input ends in a one-line ``gmmhet: error: ...`` and exit status 2,
with no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import InputError

COMMANDS = ["simulate", "convert", "build", "train", "eval", "analyze", "reconstruct", "refine"]


def _load(name: str):
    return importlib.import_module(f"scipion_gmmhet.engine.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmmhet", description=__doc__.splitlines()[0])
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"gmmhet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"scipion_gmmhet.engine.commands.{name}":
                raise
            continue
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else name, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    try:
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
