"""Particle data: memory-mapped images, and poses + CTF + images as batches on the device.

:class:`ParticleImages` reads a metadata's stacks (memory maps, one fancy index per stack);
:class:`ArrayImages` holds images in an array (tests, small sets). :class:`Particles` adds the
poses, origins and CTF (moved to the device once), optional symmetry expansion and Fourier
cropping, and serves batches of items (:class:`HostBatch` in host memory, :class:`Batch` on
the device).

CTF of the model projection (``ctf_mode``, the vocabulary of :mod:`ctf_modes`): ``full``
multiplies by RELION's CTF (raw images); ``phase_flipped`` by ``|CTF|``; ``premultiplied`` by
``CTF^2`` (images already multiplied by the CTF, ``rlnCtfDataAreCtfPremultiplied``); ``none``
applies none. ``auto`` picks ``premultiplied`` when every optics group of the star says so,
``full`` when the star has CTF parameters, else ``none``. In ``full`` mode the particles whose
optics group is flagged ``rlnCtfDataAreCtfPremultiplied = 1`` get ``CTF^2`` (a per-particle
flag kept on the device, chosen with ``torch.where``: star files that mix raw and premultiplied
optics groups), as :mod:`analysis.reconstruct` does.

Reading a batch has a host half (:meth:`Particles.read`: images into host memory, pinned when
the device is CUDA; no device work, so it may run on the prefetch thread of
:mod:`training.prefetch`) and a device half (:meth:`Particles.to_device`: non-blocking
transfer, Fourier transform, geometry and CTF). ``Particles.batch`` does both.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..conventions import ctf_2d, fourier_grid, image_to_fourier
from ..ctf_modes import ctf_mode as parse_ctf_mode
from ..device import pinned
from ..errors import InputError
from .loader import read_rows
from .metadata import ParticleMetadata
from .mrc import open_stack

log = logging.getLogger(__name__)

_CTF_KEYS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kv", "cs_mm", "amplitude_contrast",
             "phase_shift_deg", "bfactor", "scale")


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


class ArrayImages:
    """Images held in an array ``(N, D, D)`` (tests, small sets); same ``get`` as :class:`ParticleImages`."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def get(self, rows) -> np.ndarray:
        return np.asarray(self.images[np.asarray(rows)], dtype=np.float32)


@dataclass
class Batch:
    """One batch of items on the device: image transforms and the geometry/CTF to model them."""
    items: torch.Tensor          # (B,) long, expanded item numbers
    F_img: torch.Tensor          # (B, D, D//2+1) complex
    rotations: torch.Tensor      # (B, 3, 3) RELION matrices (symmetry-expanded)
    origins_A: torch.Tensor      # (B, 2)
    ctf: torch.Tensor | None     # (B, D, D//2+1) real, already in the ctf_mode's form


@dataclass
class HostBatch:
    """One batch of items read into host memory, before the transfer (:meth:`Particles.read`):
    pinned when the device is CUDA. Slicing (``host[i0:i1]``) keeps rows aligned with ``items``."""
    items: np.ndarray                      # (B,) int64, expanded item numbers
    images: torch.Tensor                   # (B, D, D) float32, real space
    features: torch.Tensor | None = None   # (B, F) float16 rows of the feature cache, when used

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, sel: slice) -> "HostBatch":
        return HostBatch(self.items[sel], self.images[sel], None if self.features is None else self.features[sel])


class Particles:
    """Per-particle poses and CTF (small arrays, moved to the device once) plus lazily read
    images, with optional symmetry expansion (item ``i * n_ops + s`` = particle row ``i``
    with operator ``s``, see :mod:`symmetry`)."""

    def __init__(self, images, rotations: np.ndarray, origins_A: np.ndarray, box: int, apix: float,
                 ctf: dict | None = None, ctf_mode: str = "full", sym_ops: np.ndarray | None = None,
                 device="cpu", premultiplied: np.ndarray | None = None):
        """``premultiplied``: ``(N,)`` bool, the particles whose images are CTF-premultiplied
        (:meth:`metadata.ParticleMetadata.ctf_premultiplied`); used in ``full`` mode only (those
        particles are modelled with ``CTF^2``, the others with the CTF)."""
        self.images = images
        self.box, self.apix = int(box), float(apix)
        self.n_particles = int(np.asarray(rotations).shape[0])
        self.device = torch.device(device)
        ctf_mode = parse_ctf_mode(ctf_mode, "ctf_mode", quiet=True)  # 0.1 spellings of old configs too
        if ctf_mode == "auto":
            raise ValueError("ctf_mode: give the images' mode (full, phase_flipped, premultiplied, none), not auto")
        if ctf_mode != "none" and ctf is None:
            from .validate import ctf_missing_message
            raise InputError(ctf_missing_message("particles"))
        self.ctf_mode = ctf_mode
        ops = np.eye(3)[None] if sym_ops is None else np.asarray(sym_ops)
        self.n_ops = int(ops.shape[0])
        f32 = dict(dtype=torch.float32, device=self.device)
        self.rotations = torch.as_tensor(np.asarray(rotations, dtype=np.float32), **f32)
        self.origins_A = torch.as_tensor(np.asarray(origins_A, dtype=np.float32).reshape(-1, 2), **f32)
        self.sym_ops = torch.as_tensor(ops.astype(np.float32), **f32)
        self.ctf = None
        if ctf is not None and ctf_mode != "none":
            self.ctf = {k: torch.as_tensor(np.asarray(ctf[k], dtype=np.float32), **f32) for k in _CTF_KEYS if k in ctf}
            if "bfactor" in self.ctf and not bool((self.ctf["bfactor"] != 0).any()):
                del self.ctf["bfactor"]  # skips a per-batch host sync inside ctf_2d
        # per-particle CTF^2 in 'full' mode (mixed optics groups); None when no particle needs it,
        # so an all-raw set costs nothing. A bool tensor on the device: no host sync per batch.
        self.premultiplied = None
        if self.ctf is not None and ctf_mode == "full" and premultiplied is not None:
            flags = np.asarray(premultiplied, dtype=bool).reshape(-1)
            if flags.size != self.n_particles:
                raise ValueError(f"premultiplied must have one flag per particle ({self.n_particles}), got {flags.size}")
            if flags.any():
                self.premultiplied = torch.as_tensor(flags, device=self.device)
        self.crop(None)

    def crop(self, highres_A: float | None) -> None:
        """Work on the Fourier coefficients up to ``highres_A`` only (Fourier cropping).

        The frequencies ``m / (D apix)`` with ``|m| < D'/2`` of a ``D``-px image are exactly
        those of a ``D'``-px image of pixel size ``D apix / D'``, so images are cropped in
        Fourier space to ``D' = 2 (ring(highres_A) + 1)`` (even, at most ``D``) and models
        projected at (``fbox``, ``fapix``) = (``D'``, ``D apix / D'``): the FRC over the band
        is unchanged, the cost falls by about ``(D / D')^2``. ``None``: no cropping.
        """
        if highres_A is None:
            fbox = self.box
        else:
            ring = int(np.floor(self.box * self.apix / float(highres_A)))
            fbox = min(self.box, 2 * (ring + 1))
        self.fbox = int(fbox)
        self.fapix = self.box * self.apix / self.fbox
        self.ky, self.kx = fourier_grid(self.fbox, self.fapix, rfft=True, device=self.device)
        half = self.fbox // 2
        self._crop_rows = torch.cat([torch.arange(half), torch.arange(self.box - half, self.box)]).to(self.device)

    def crop_fourier(self, F: torch.Tensor) -> torch.Tensor:
        """``(B, D, D//2+1)`` transforms -> ``(B, D', D'//2+1)`` (see :meth:`crop`)."""
        if self.fbox == self.box:
            return F
        return F.index_select(-2, self._crop_rows)[..., :self.fbox // 2 + 1]

    def __len__(self) -> int:
        return self.n_particles * self.n_ops

    @classmethod
    def from_star(cls, star_path: str, symmetry: str | None = None, ctf_mode: str = "auto", device="cpu",
                  check_files: bool = True) -> "Particles":
        """Particles of a RELION star (via :mod:`metadata` and :class:`ParticleImages`)."""
        from . import metadata
        from ..model.symmetry import symmetry_operators
        meta = metadata.read_particles(star_path)
        ctf_mode = parse_ctf_mode(ctf_mode, "ctf_mode", quiet=True)
        has_ctf = bool(meta.has_ctf())
        meta.validate(require_alignment=True, require_ctf=has_ctf and ctf_mode != "none", check_images=check_files)
        ctf_mode, ctf, premultiplied = ctf_of(meta, ctf_mode, star_path)
        ops = symmetry_operators(symmetry)
        return cls(ParticleImages(meta), meta.rotation_matrices(), meta.origins_A(), meta.box, meta.apix,
                   ctf=ctf, ctf_mode=ctf_mode, sym_ops=ops if len(ops) > 1 else None, device=device,
                   premultiplied=premultiplied)

    def batch(self, items) -> Batch:
        """Load the images of expanded items (numpy or tensor ints) -> :class:`Batch` on the device
        (:meth:`read` then :meth:`to_device`)."""
        return self.to_device(self.read(items))

    def read(self, items) -> HostBatch:
        """The host-side half of :meth:`batch`: read the images of expanded items into host memory
        (pinned when the device is CUDA), refusing NaN/Inf pixels. Touches no device, so it may
        run on a background thread (:mod:`prefetch`)."""
        items_np = np.asarray(items.cpu() if isinstance(items, torch.Tensor) else items, dtype=np.int64)
        rows = items_np // self.n_ops
        uniq, inverse = np.unique(rows, return_inverse=True)
        imgs = read_rows(self.images, uniq)  # contiguous runs of each stack: one read per run
        if not np.isfinite(imgs).all():  # cheap (host memory, before the transfer); one NaN spoils every latent
            self._refuse_nonfinite(uniq, imgs)
        img = torch.as_tensor(imgs)
        if len(uniq) != len(rows) or not np.array_equal(uniq, rows):
            img = img[torch.as_tensor(inverse)]
        return HostBatch(items_np, pinned(img, self.device))

    def to_device(self, host: HostBatch) -> Batch:
        """The device half of :meth:`batch`: transfer (non-blocking from pinned memory), Fourier
        transform and crop the images, and add the items' geometry and CTF."""
        img = host.images.to(self.device, non_blocking=True)
        items_t = pinned(torch.as_tensor(host.items), self.device).to(self.device, non_blocking=True)  # no host sync
        return self.geometry(items_t, self.crop_fourier(image_to_fourier(img)))

    def image_name(self, row: int) -> str:
        """``'000005@stack.mrcs'`` for particle row ``row`` (0-based) when the images come from
        stacks (:class:`ParticleImages`), else ``'particle row N'`` (1-based)."""
        im = self.images
        if hasattr(im, "stack_paths") and hasattr(im, "index"):
            return f"{int(im.index[row]) + 1:06d}@{im.stack_paths[int(im.stack_code[row])]}"
        return f"particle row {int(row) + 1}"

    def _refuse_nonfinite(self, rows: np.ndarray, imgs: np.ndarray) -> None:
        bad = np.flatnonzero(~np.isfinite(imgs.reshape(len(imgs), -1)).all(axis=1))
        row = int(rows[bad[0]])
        source = getattr(self.images, "source", "particles")
        raise InputError(f"{source}: NaN or Inf pixel values in image {self.image_name(row)} (particle row {row + 1}"
                         f"{f' and {bad.size - 1} more in this batch' if bad.size > 1 else ''}); re-extract or "
                         "re-normalise the particles, or remove those rows")

    def check_finite_sample(self, sample: int = 256, name: str | None = None, seed: int = 0) -> None:
        """Refuse NaN/Inf pixels in a bounded sample of the images (first, last and ``sample``
        seeded random particles; see :func:`validate.check_images_finite`)."""
        from .validate import check_images_finite
        if hasattr(self.images, "get") and hasattr(self.images, "__len__"):
            check_images_finite(self.images, sample=sample, name=name or getattr(self.images, "source", "particles"),
                                seed=seed)

    def geometry(self, items: torch.Tensor, F_img: torch.Tensor | None = None) -> Batch:
        rows = torch.div(items, self.n_ops, rounding_mode="floor")
        rot = self.rotations[rows]
        if self.n_ops > 1:
            rot = rot @ self.sym_ops[items % self.n_ops]
        ctf = None
        if self.ctf is not None:
            p = {k: v[rows] for k, v in self.ctf.items()}
            ctf = ctf_2d(self.ky, self.kx, **p)
            if self.ctf_mode == "phase_flipped":
                ctf = ctf.abs()
            elif self.ctf_mode == "premultiplied":
                ctf = ctf * ctf
            elif self.premultiplied is not None:  # 'full' with some premultiplied particles
                ctf = torch.where(self.premultiplied[rows].reshape(-1, 1, 1), ctf * ctf, ctf)
        return Batch(items, F_img, rot, self.origins_A[rows], ctf)


def ctf_of(meta: ParticleMetadata, ctf_mode: str | None, name: str) -> tuple[str, dict | None, np.ndarray | None]:
    """``(mode, CTF parameters or None, per-particle premultiplied flags or None)`` for
    :class:`Particles` of ``meta``. ``auto``/None: ``premultiplied`` when every particle's optics
    group is flagged ``rlnCtfDataAreCtfPremultiplied``, ``full`` otherwise (the flagged particles,
    if any, get ``CTF^2`` through the flags), ``none`` refused without CTF parameters unless
    chosen (:func:`validate.resolve_ctf_mode`). ``name`` names the particles in messages."""
    from .validate import resolve_ctf_mode  # no CTF: refused unless ctf_mode == "none"
    has_ctf = bool(meta.has_ctf())
    flags = np.asarray(meta.ctf_premultiplied(), dtype=bool) if has_ctf else np.zeros(len(meta), dtype=bool)
    mode = resolve_ctf_mode(has_ctf, parse_ctf_mode(ctf_mode, "ctf_mode", quiet=True), name,
                            premultiplied=bool(flags.size) and bool(flags.all()))
    if mode == "none":
        return mode, None, None
    if mode == "full" and flags.any() and not flags.all():
        log.info("%s: %d of %d particles are CTF-premultiplied (rlnCtfDataAreCtfPremultiplied by optics "
                 "group): modelled with CTF^2, the others with the CTF", name, int(flags.sum()), flags.size)
    return mode, meta.ctf_params(), (flags if mode == "full" else None)
