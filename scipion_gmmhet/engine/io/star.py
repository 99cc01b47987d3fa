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
from ..errors import InputError

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


def _decode(path: str, raw: bytes | None = None) -> str:
    if raw is None:
        raw = _read_raw(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text; give a RELION .star file") from None


def read_star(path) -> dict[str, pd.DataFrame]:
    """Read every block of a STAR file -> ``{block name: DataFrame}`` (see the module docstring)."""
    path = os.fspath(path)
    held = [_read_raw(path)]
    frames = _read_fast(path, held)  # drops the bytes from ``held`` once it no longer needs them
    if frames is None:
        text = _decode(path, held.pop())
        frames = _read_reference(path, text)
    return frames


def _read_reference(path: str, text: str) -> dict[str, pd.DataFrame]:
    """The line-by-line reader: the reference for :func:`_read_fast` and its fallback."""
    return {name: b.frame() for name, b in _parse_blocks(path, text).items()}


def _parse_blocks(path: str, text: str) -> dict[str, _Block]:
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
    return blocks


# ----------------------------------------------------------------------------- fast path for big tables
# The rows of a big loop table are typed straight from the file's bytes, with numpy (integers) and
# pandas' C parser (floats, with Python's own float parsing: float_precision="round_trip"), instead
# of one Python str per cell. The result is the reference reader's, value for value and dtype for
# dtype: the fast path takes only rows of plain ASCII words (no quotes, no '#', no control or
# non-ASCII characters), checks that every non-blank line has as many words as the table has
# labels, and types each column with _column's rules; a column that is not plainly int or float
# (names, 'nan', integers of 19+ digits, anything odd) gets its exact text and goes through
# _column itself. The rest of the file (headers, labels, small tables) is read by the reference
# parser with each big table's rows replaced by one placeholder row. Anything irregular (a wrong
# word count, a label after the rows, text that is not UTF-8, ...) falls back to the reference
# reader, which then raises its usual error naming the file and the line.
_FAST_MIN_ROWS = 1000  # tables of fewer lines keep the reference path
_FAST_CHUNK = 1 << 21  # bytes of rows analysed at a time
# the start of a line the reference reader does not take as a table row: a label, a comment,
# data_, loop_ (a match starts at the '\n' before the line)
_BOUNDARY = re.compile(rb"\n[ \t]*(?:[_#]|[dD][aA][tT][aA]_|[lL][oO][oO][pP]_)")
_FIRST_WORD = re.compile(rb"[^ \t\r\n]")
# byte classes: 0 blank, 1 digit, 2 sign, 3 '.eE', 4 any other printable ASCII except quotes and
# '#', 5 anything else (the fast path does not take the table)
_CLASS = np.full(256, 5, dtype=np.uint8)
_CLASS[33:127] = 4
_CLASS[[9, 10, 13, 32]] = 0
_CLASS[48:58] = 1
_CLASS[[ord("+"), ord("-")]] = 2
_CLASS[[ord("."), ord("e"), ord("E")]] = 3
_CLASS[[ord('"'), ord("'"), ord("#")]] = 5
_PAD = 24  # > the longest integer word typed with numpy (sign + 18 digits)


def _read_raw(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a STAR file; give the .star file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    if not raw or raw.isspace():  # not raw.strip(): that would copy the whole file
        raise InputError(f"{path}: empty file; give a RELION .star file")
    if b"\x00" in raw[:65536]:
        raise InputError(f"{path}: binary data, not a STAR text file; give a RELION .star file")
    return raw


def _row_regions(raw: bytes) -> list[tuple[int, int, int]]:
    """``(start, end, ncols)`` of each run of at least ``_FAST_MIN_ROWS`` lines, between two
    lines the reference reader does not take as rows, that may be plain rows: no quote, no '#',
    no lone CR; ``ncols`` is the number of words of its first non-blank line."""
    bounds = [m.start() + 1 for m in _BOUNDARY.finditer(raw)]
    out = []
    for i, start in enumerate(bounds):
        eol = raw.find(b"\n", start)
        if eol < 0:
            break
        a = eol + 1
        b = bounds[i + 1] if i + 1 < len(bounds) else len(raw)
        if raw.count(b"\n", a, b) < _FAST_MIN_ROWS:
            continue
        if raw.find(b'"', a, b) >= 0 or raw.find(b"'", a, b) >= 0 or raw.find(b"#", a, b) >= 0:
            continue
        if raw.find(b"\r", a, b) >= 0 and raw.count(b"\r", a, b) != raw.count(b"\r\n", a, b):
            continue
        m = _FIRST_WORD.search(raw, a, b)
        if m is None:
            continue
        e = raw.find(b"\n", m.start(), b)
        out.append((a, b, len(raw[m.start(): b if e < 0 else e].split())))
    return out


def _fast_columns(raw: bytes, a: int, b: int, ncols: int) -> list[np.ndarray] | None:
    """Typed columns of the rows in ``raw[a:b]``, exactly as ``_column`` types them; None when a
    non-blank line has not ``ncols`` words or holds a character the fast path does not take."""
    buf = np.frombuffer(raw, dtype=np.uint8, count=b - a, offset=a)
    n = len(buf)
    colmax = np.zeros(ncols, np.uint8)  # highest byte class in each column
    lead_zero = np.zeros(ncols, bool)  # any word like '0003', '-07'
    int_ok = np.ones(ncols, bool)  # every word so far is [+-]?[0-9]{1,18}
    int_parts: list[list[np.ndarray]] = [[] for _ in range(ncols)]
    nrows = 0
    s = 0
    while s < n:
        e = int(raw.find(b"\n", a + min(s + _FAST_CHUNK, n) - 1, b)) + 1 - a
        e = n if e <= 0 else e
        c = np.full(e - s + _PAD, 32, dtype=np.uint8)
        c[: e - s] = buf[s:e]
        s = e
        cls = _CLASS[c]
        if cls.max() >= 5:
            return None
        word = cls != 0
        starts = np.flatnonzero(word[1:] & ~word[:-1]) + 1
        if word[0]:
            starts = np.concatenate(([0], starts))
        if len(starts) == 0:
            continue
        counts = np.bincount(np.searchsorted(np.flatnonzero(c == 10), starts))
        if np.any(counts[counts != 0] != ncols):
            return None
        rows = len(starts) // ncols
        nrows += rows
        wmax = np.maximum.reduceat(cls, starts).reshape(rows, ncols)
        wlen = np.add.reduceat(word, starts, dtype=np.int64)
        nsign = np.add.reduceat(cls == 2, starts, dtype=np.int64)
        colmax = np.maximum(colmax, wmax.max(0))
        f0, f1, f2 = c[starts], c[starts + 1], c[starts + 2]
        signed = (f0 == 43) | (f0 == 45)
        digit1, digit2 = (f1 >= 48) & (f1 <= 57), (f2 >= 48) & (f2 <= 57)
        lead_zero |= (((f0 == 48) & digit1) | (signed & (f1 == 48) & digit2)).reshape(rows, ncols).any(0)
        ndig = (wlen - signed).reshape(rows, ncols)
        bad = (nsign != signed).reshape(rows, ncols).any(0) | (ndig < 1).any(0) | (ndig > 18).any(0)
        int_ok &= ~bad & ~lead_zero & (colmax <= 2)
        S, SG = starts.reshape(rows, ncols), signed.reshape(rows, ncols)
        for j in np.flatnonzero(int_ok):
            ds, nd = S[:, j] + SG[:, j], ndig[:, j]
            val = np.zeros(rows, dtype=np.int64)
            for k in range(int(nd.max())):
                val = np.where(nd > k, val * 10 + (c[ds + k].astype(np.int64) - 48), val)
            int_parts[j].append(np.where(c[S[:, j]] == 45, -val, val))
    cols: list = [None] * ncols
    for j in np.flatnonzero(int_ok):
        cols[j] = np.concatenate(int_parts[j]) if int_parts[j] else np.zeros(0, np.int64)
    int_parts.clear()
    floats = [j for j in range(ncols) if not int_ok[j] and colmax[j] == 3 and not lead_zero[j]]
    texts = [j for j in range(ncols) if not int_ok[j] and j not in floats]
    if floats or texts:
        df = _read_words(raw, a, b, {j: np.float64 for j in floats} | {j: object for j in texts})
        if df is None and floats:  # a word pandas would not read as a float: type their text
            texts, floats = sorted(texts + floats), []
            df = _read_words(raw, a, b, {j: object for j in texts})
        if df is None or len(df) != nrows:
            return None
        for j in floats:
            cols[j] = df.pop(j).to_numpy(dtype=np.float64)
        for j in texts:
            values = df.pop(j).tolist()
            if not all(type(v) is str for v in values):
                return None
            cols[j] = _column(values)
        del df
    if any(len(col) != nrows for col in cols):
        return None
    return cols


def _read_words(raw: bytes, a: int, b: int, dtypes: dict) -> pd.DataFrame | None:
    """Columns ``dtypes`` (index: float64 or object) of the whitespace-separated words of
    ``raw[a:b]``; None when pandas cannot read them so."""
    import csv
    import io
    import warnings
    f = io.BytesIO(raw if b == len(raw) else raw[a:b])  # shares ``raw``'s buffer: no copy
    f.seek(a if b == len(raw) else 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pd.read_csv(f, sep=r"\s+", header=None, index_col=False, usecols=sorted(dtypes),
                               dtype=dtypes, engine="c", na_filter=False, keep_default_na=False,
                               quoting=csv.QUOTE_NONE, comment=None, skip_blank_lines=True,
                               float_precision="round_trip", encoding="ascii")
    except (ValueError, TypeError, OverflowError, pd.errors.ParserError):
        return None


def _read_fast(path: str, held: list) -> dict[str, pd.DataFrame] | None:
    """Read the file's bytes ``held[0]`` as the reference reader does, typing big tables' rows
    without a str per cell; None (``held`` untouched) when the fast path does not apply: the
    caller then runs the reference reader. Empties ``held`` on success, so that the bytes are
    freed before the frames are built."""
    raw = held[0]
    if b"\x00" in raw:
        return None
    regions = _row_regions(raw)
    if not regions:
        return None
    # the file with each region replaced by one placeholder row, read by the reference parser
    parts, pos, marks = [], 0, []
    for i, (a, b, ncols) in enumerate(regions):
        marks.append([f"\x00{i}"] * ncols)
        parts += [raw[pos:a], " ".join(marks[i]).encode(), b"\n"]
        pos = b
    parts.append(raw[pos:])
    try:
        blocks = _parse_blocks(path, b"".join(parts).decode("utf-8"))
    except (InputError, UnicodeDecodeError):
        return None
    del parts
    owner: dict[str, int] = {}
    for name, blk in blocks.items():
        for row in blk.rows:
            if row[0].startswith("\x00"):
                i = int(row[0][1:])
                if row != marks[i] or len(blk.rows) != 1 or i in owner.values():
                    return None
                owner[name] = i
    if len(owner) != len(regions):
        return None
    typed = {}
    for name, i in owner.items():
        cols = _fast_columns(raw, *regions[i])
        if cols is None or len(cols) != len(blocks[name].labels):
            return None
        typed[name] = cols
    held.clear()
    del raw
    out = {}
    for name, blk in blocks.items():
        if name in typed:
            # copy=False: the frame takes these fresh arrays as they are (a block per column) instead of
            # copying them once more: equal frames, without a transient copy of every column
            out[name] = pd.DataFrame(dict(zip(blk.labels, typed.pop(name))), columns=blk.labels, copy=False)
        else:
            out[name] = blk.frame()
    return out


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
