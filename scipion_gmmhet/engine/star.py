"""STAR files (RELION's metadata format): a small, strict reader and an atomic writer.

Only the part of STAR that RELION reads and writes is supported: ``data_NAME`` blocks, each
holding either one ``loop_`` table or ``_label value`` pairs, ``#`` comments, quoted
strings. Every block becomes a :class:`pandas.DataFrame` (a key-value block is one row),
keyed by the block name without ``data_`` (``'optics'``, ``'particles'``, ``''`` for a bare
``data_``). Column names lose the leading underscore and the ``#N`` comment
(``'rlnImageName'``). Columns whose every value is a number become int64 or float64; the
rest stay ``str`` (values with leading zeros such as ``000001`` stay strings, so names are
never mangled).

Malformed input raises :class:`~.errors.InputError` naming the file and the line.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd

from .atomic import atomic_path
from .errors import InputError

_TOKEN = re.compile(r"""\s*(?:"([^"]*)"(?=\s|$)|'([^']*)'(?=\s|$)|(\S+))""")
_LEADING_ZERO = re.compile(r"^[+-]?0\d", re.MULTILINE)
_NEEDS_QUOTES = re.compile(r"""\s|^$|^["'#_]|^(?:data_|loop_|save_|global_|stop_)""", re.IGNORECASE)


def _tokens(line: str, where: str) -> list[str]:
    """Split one line into values (quotes removed), dropping a trailing ``#`` comment."""
    if '"' not in line and "'" not in line:
        out = line.split()
    else:
        out, pos, n = [], 0, len(line)
        while pos < n:
            m = _TOKEN.match(line, pos)
            if m is None or m.end() == pos:
                break
            pos = m.end()
            if m.group(1) is not None:
                out.append(m.group(1))
            elif m.group(2) is not None:
                out.append(m.group(2))
            elif m.group(3) is not None:
                tok = m.group(3)
                if tok[0] in "\"'":
                    raise InputError(f"{where}: unclosed quote; fix or remove the quoted value")
                if tok[0] == "#":
                    return out
                out.append(tok)
        return out
    for i, tok in enumerate(out):
        if tok[0] == "#":
            return out[:i]
    return out


def _column(values) -> np.ndarray:
    """Typed array for one column: int64, float64, or object (str).

    Values with leading zeros ('0003', '-007') or underscores are names, not numbers, so
    such a column keeps its text.
    """
    n = len(values)
    if n == 0:
        return np.asarray(values, dtype=object)
    joined = "\n".join(values)
    if "_" in joined or _LEADING_ZERO.search(joined):
        return np.asarray(values, dtype=object)
    try:
        return np.fromiter(map(int, values), dtype=np.int64, count=n)
    except (ValueError, OverflowError):
        pass
    try:
        return np.fromiter(map(float, values), dtype=np.float64, count=n)
    except (ValueError, OverflowError):
        return np.asarray(values, dtype=object)


class _Block:
    def __init__(self, name: str, line_no: int):
        self.name = name
        self.line_no = line_no
        self.labels: list[str] = []
        self.rows: list[list[str]] = []
        self.pairs: dict[str, str] = {}
        self.loop = False

    def frame(self) -> pd.DataFrame:
        if self.loop:
            cols = list(zip(*self.rows)) if self.rows else [() for _ in self.labels]
            return pd.DataFrame({lab: _column(list(c)) for lab, c in zip(self.labels, cols)},
                                columns=self.labels)
        return pd.DataFrame({k: _column([v]) for k, v in self.pairs.items()}, columns=list(self.pairs))


def _decode(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a STAR file; give the .star file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    if not raw.strip():
        raise InputError(f"{path}: empty file; give a RELION .star file")
    if b"\x00" in raw[:65536]:
        raise InputError(f"{path}: binary data, not a STAR text file; give a RELION .star file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text; give a RELION .star file") from None


def read_star(path) -> dict[str, pd.DataFrame]:
    """Read every block of a STAR file -> ``{block name: DataFrame}`` (see the module docstring)."""
    path = os.fspath(path)
    text = _decode(path)
    blocks: dict[str, _Block] = {}
    block: _Block | None = None
    state = "none"  # none | block | labels | rows
    for line_no, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line[0] == "#":
            continue
        if state in ("labels", "rows") and line[0] not in "_dDlL":  # fast path: a table row
            if not block.labels:
                raise InputError(f"{path}:{line_no}: loop_ without labels in data_{block.name}")
            toks = (_tokens(line, f"{path}:{line_no}") if ('"' in line or "'" in line or "#" in line)
                    else line.split())
            if len(toks) != len(block.labels):
                if not toks:
                    continue
                raise InputError(f"{path}:{line_no}: row has {len(toks)} values but data_{block.name} "
                                 f"has {len(block.labels)} columns; the file is truncated or corrupt")
            block.rows.append(toks)
            state = "rows"
            continue
        where = f"{path}:{line_no}"
        low = line[:5].lower()
        if low == "data_":
            name = _tokens(line, where)[0][5:]
            if name in blocks:
                raise InputError(f"{where}: block data_{name} appears twice; remove one of them")
            block = blocks[name] = _Block(name, line_no)
            state = "block"
            continue
        if block is None:
            raise InputError(f"{where}: content before the first data_ block; "
                             "is this a RELION .star file?")
        if low == "loop_":
            if block.loop or block.pairs:
                raise InputError(f"{where}: second table in block data_{block.name}; "
                                 "RELION stars hold one table per block")
            if line[5:].strip() and not line[5:].strip().startswith("#"):
                raise InputError(f"{where}: unexpected text after loop_")
            block.loop = True
            state = "labels"
            continue
        if line[0] == "_":
            toks = _tokens(line, where)
            label = toks[0][1:]
            if not label:
                raise InputError(f"{where}: empty label '_'; fix the label")
            if state == "labels":
                if label in block.labels:
                    raise InputError(f"{where}: label _{label} appears twice in data_{block.name}")
                block.labels.append(label)
                continue
            if block.loop:
                raise InputError(f"{where}: label _{label} after the rows of the table in "
                                 f"data_{block.name}; labels belong before the rows")
            if len(toks) != 2:
                raise InputError(f"{where}: expected '_{label} value', got {len(toks) - 1} values")
            if label in block.pairs:
                raise InputError(f"{where}: label _{label} appears twice in data_{block.name}")
            block.pairs[label] = toks[1]
            continue
        if state in ("labels", "rows"):  # a row starting with d/l that is not data_/loop_
            if not block.labels:
                raise InputError(f"{where}: loop_ without labels in data_{block.name}")
            toks = _tokens(line, where)
            if len(toks) != len(block.labels):
                raise InputError(f"{where}: row has {len(toks)} values but data_{block.name} has "
                                 f"{len(block.labels)} columns; the file is truncated or corrupt")
            block.rows.append(toks)
            state = "rows"
            continue
        raise InputError(f"{where}: unexpected line {line[:40]!r} outside a table; "
                         "is this a RELION .star file?")
    if not blocks:
        raise InputError(f"{path}: no data_ blocks; is this a RELION .star file?")
    for b in blocks.values():
        if b.loop and not b.labels:
            raise InputError(f"{path}:{b.line_no}: loop_ without labels in data_{b.name}")
    return {name: b.frame() for name, b in blocks.items()}


def _format_column(col: pd.Series) -> list[str]:
    values = col.to_numpy()
    kind = values.dtype.kind
    if kind == "b":
        return [str(int(v)) for v in values]
    if kind in "iu":
        return [str(v) for v in values.tolist()]
    if kind == "f":
        return list(map(float.__repr__, values.astype(np.float64).tolist()))
    out = []
    for v in values.tolist():
        if isinstance(v, float):
            s = repr(v)
        elif isinstance(v, bytes):
            s = v.decode("utf-8", "replace")
        else:
            s = str(v)
        if _NEEDS_QUOTES.search(s):
            s = f"'{s}'" if '"' in s else f'"{s}"'
        out.append(s)
    return out


def write_star(path, blocks: dict[str, pd.DataFrame]) -> None:
    """Write blocks as RELION ``loop_`` tables, atomically (``path.tmp`` then rename).

    Floats are written with Python's shortest round-trip repr, so reading the file back
    gives bit-identical float64 values.
    """
    path = os.fspath(path)
    parts = []
    for name, df in blocks.items():
        parts.append(f"\n# version 30001\n\ndata_{name}\n\nloop_\n")
        parts.extend(f"_{c} #{i}\n" for i, c in enumerate(df.columns, start=1))
        if len(df.columns):
            cols = [_format_column(df[c]) for c in df.columns]
            parts.extend(" ".join(row) + "\n" for row in zip(*cols))
        parts.append("\n")
    with atomic_path(path) as tmp:  # InputError on a full disk; no half-written file or stray .tmp
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(parts))
