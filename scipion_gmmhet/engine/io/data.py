"""Batched, memory-mapped access to the particle images of a :class:`ParticleMetadata`."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError
from .metadata import ParticleMetadata
from .mrc import open_stack


class ParticleImages:
    """Memory-mapped access to a metadata's particle images (stacks opened lazily, read-only).

    ``get(rows)`` returns float32 copies of the images of particle rows ``rows`` (rows of
    ``meta.particles``), reading each stack with one fancy index. Picklable: the memory maps
    are not pickled but reopened on demand (e.g. in DataLoader worker processes).
    """

    def __init__(self, meta: ParticleMetadata):
        paths, idx = meta.image_locations()
        codes, stacks = pd.factorize(paths)
        self.source = meta.source
        self.stack_paths = [str(p) for p in stacks]
        self.stack_code = codes.astype(np.int64)
        self.index = idx.astype(np.int64)
        self._maps: dict[int, np.ndarray] = {}
        self._box: int | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _stack(self, code: int) -> np.ndarray:
        stack = self._maps.get(code)
        if stack is None:
            stack = open_stack(self.stack_paths[code])
            if self._box is None:
                self._box = int(stack.shape[1])
            elif stack.shape[1] != self._box:
                raise InputError(f"{self.stack_paths[code]}: images are {stack.shape[1]} px but other "
                                 f"stacks of {self.source} are {self._box} px; use one box size")
            self._maps[code] = stack
        return stack

    @property
    def box(self) -> int:
        """Image size in pixels (from the first stack's header)."""
        if self._box is None:
            if not len(self):
                raise InputError(f"{self.source}: no particles")
            self._stack(int(self.stack_code[0]))
        return int(self._box)

    def get(self, rows) -> np.ndarray:
        """``(B, D, D)`` float32 images of particle rows ``rows``, in the order of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return np.zeros((0, self.box, self.box), dtype=np.float32)
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"particle rows out of range 0..{len(self) - 1}")
        codes = self.stack_code[rows]
        index = self.index[rows]
        out = np.empty((rows.size, self.box, self.box), dtype=np.float32)
        for code in np.unique(codes):
            stack = self._stack(int(code))
            sel = np.flatnonzero(codes == code)
            want = index[sel]
            if want.max() >= stack.shape[0] or want.min() < 0:
                bad = int(want.max() if want.max() >= stack.shape[0] else want.min())
                raise InputError(f"{self.source}: image {bad + 1}@{self.stack_paths[code]} is outside "
                                 f"the stack ({stack.shape[0]} images); the star file and stack do not match")
            order = np.argsort(want, kind="stable")
            out[sel[order]] = stack[want[order]]
        return out
