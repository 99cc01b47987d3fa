"""Pre-flight checks shared by the ``gmmhet`` commands and the Scipion protocols.

Every check runs before any GPU time is spent and raises a one-line
:class:`~.errors.InputError` naming the input and the fix; it returns quietly (or with a note
to log) when the input is usable. The particle-table checks that
:meth:`metadata.ParticleMetadata.validate` already makes (missing columns, unknown optics
groups, duplicate particles, missing stacks, indices past the end of a stack, non-finite
poses/CTF) are not repeated here: :func:`check_particles` calls it.

Particles and map with a different box or pixel size (:func:`check_particles_vs_map`)
    The GMM is continuous and in Angstrom, so projecting it at the particles' sampling is
    valid as long as the particles' field of view (``box * apix``) holds the whole model.
    Policy: by default this REFUSES, naming both samplings and the resampling command,
    because a mismatch is far more often a wrong input (binned particles, another job's map)
    than an intention. A caller that offers resampling (``allow_resample=True``) gets it
    accepted when the particle box covers the model, with a note to log saying so; when it
    does not, it is refused. A mismatch is never silent.

CTF (:func:`resolve_ctf_mode`, :func:`check_particles`)
    Particles without CTF parameters are refused unless the user chose "no CTF" explicitly
    (``--ctf none`` on the command line, CTF = none in the Scipion form): the same function and
    the same message for both. ``auto`` never turns into "ignore the CTF" silently.

Masks (:func:`check_mask_matches`)
    A mask on another box or pixel size than the map it belongs to (the consensus map for
    ``build``, the Gaussian model's grid for ``train``/``refine``/``analyze``) is refused, by
    every command and every protocol, with one message.

The protocols call these same functions in ``_validate`` (with the form field as the input's
name), so the command line and the GUI refuse the same input with the same text after the name.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

APIX_RTOL = 1e-3  # pixel sizes within 0.1% are the same sampling (header rounding)
MIN_MAP_BOX = 8


def _fmt_shape(shape: Sequence[int]) -> str:
    """``(z, y, x)`` array shape -> ``'X x Y x Z'`` as the user reads it."""
    return " x ".join(str(int(v)) for v in tuple(shape)[::-1])


def same_apix(a: float, b: float, rtol: float = APIX_RTOL) -> bool:
    return abs(float(a) - float(b)) <= rtol * max(abs(float(a)), abs(float(b)))


# ----------------------------------------------------------------------------------- particles
def check_particles(meta, need_ctf: bool = True, min_particles: int = 2, need_alignment: bool = True,
                    check_images: bool = True, allow_duplicates: bool = False, purpose: str = "this job") -> None:
    """Refuse particles the engine cannot use (see the module docstring).

    ``meta``: :class:`metadata.ParticleMetadata`. Raises InputError for: no particles or
    fewer than ``min_particles``; no 3D alignment (``need_alignment``); no CTF
    (``need_ctf``); and everything :meth:`ParticleMetadata.validate` checks (missing
    columns, unknown optics groups, duplicates unless ``allow_duplicates``, missing stacks,
    indices past the end of a stack, non-finite poses/CTF; stacks only with ``check_images``).
    """
    src = meta.source
    n = len(meta)
    if n == 0:
        raise InputError(f"{src}: no particles; give a particle set with at least {max(1, min_particles)} particles")
    if need_ctf and "rlnImageName" in meta.particles.columns:
        resolve_ctf_mode(meta.has_ctf(), "auto", src)
    meta.validate(require_alignment=need_alignment, require_ctf=need_ctf, check_images=check_images,
                  allow_duplicates=allow_duplicates)
    if n < min_particles:
        raise InputError(f"{src}: {n} particle(s) but {purpose} needs at least {min_particles}; "
                         "give a larger particle set")


CTF_OPTION = "--ctf none"


def ctf_missing_message(name: str, option: str = CTF_OPTION) -> str:
    """The one refusal for particles without CTF parameters (command line and GUI)."""
    return (f"{name}: no CTF parameters (rlnDefocusU/V/Angle, rlnVoltage, rlnSphericalAberration, "
            f"rlnAmplitudeContrast); give particles with CTF estimates, or choose CTF none ({option}; in Scipion: "
            "CTF = none) when the images are phase-flipped or CTF-free")


def resolve_ctf_mode(has_ctf: bool, ctf_mode: str | None, name: str, premultiplied: bool = False,
                     option: str = CTF_OPTION) -> str:
    """The CTF mode to use: ``auto``/``None`` -> ``premultiplied`` or ``full`` when the particles have
    CTF parameters; ``none`` stays ``none``; any mode but ``none`` on particles without CTF
    parameters is refused (:func:`ctf_missing_message`): ignoring the CTF is an explicit choice."""
    mode = "auto" if ctf_mode is None else str(ctf_mode)
    if mode == "none":
        return "none"
    if not has_ctf:
        raise InputError(ctf_missing_message(name, option))
    if mode == "auto":
        return "premultiplied" if premultiplied else "full"
    return mode


def check_images_finite(images, sample: int | None = 256, name: str = "particles", rows=None,
                        seed: int = 0, chunk: int = 64) -> None:
    """Refuse NaN/Inf pixels.

    ``images``: an array/tensor ``(B, D, D)`` (a batch: every pixel is checked; ``rows``
    names its particle rows in the message), or an object with ``get(rows)`` and
    ``len()`` (:class:`data.ParticleImages`): then a bounded sample is read -- the first and
    last particle and ``sample`` seeded random ones (``sample=None``: all), ``chunk`` at a
    time. Call it once before training on the sample, then on every batch (cheap: one
    reduction on data already in memory).
    """
    if hasattr(images, "get") and hasattr(images, "__len__") and not hasattr(images, "shape"):
        n = len(images)
        if n == 0:
            return
        if sample is None or sample + 2 >= n:
            picked = np.arange(n)
        else:
            rng = np.random.default_rng([int(seed), 29])
            picked = np.unique(np.concatenate([[0, n - 1], rng.choice(n, size=int(sample), replace=False)]))
        for start in range(0, len(picked), chunk):
            sel = picked[start:start + chunk]
            bad = _nonfinite_rows(images.get(sel))
            if bad.size:
                row = int(sel[bad[0]])
                where = f"particle row {row + 1}"
                if hasattr(images, "stack_paths"):  # data.ParticleImages: say which image of which stack
                    where += f", {int(images.index[row]) + 1:06d}@{images.stack_paths[int(images.stack_code[row])]}"
                raise InputError(f"{name}: NaN or Inf pixel values in {bad.size} of {len(sel)} checked image(s) "
                                 f"(first: {where}); re-extract or re-normalise the particles, or remove those rows")
        return
    bad_rows = _nonfinite_rows(images)
    if bad_rows.size:
        first = int(bad_rows[0])
        row = int(np.asarray(rows).reshape(-1)[first]) if rows is not None else first
        raise InputError(f"{name}: NaN or Inf pixel values in {bad_rows.size} image(s) (first: particle row "
                         f"{row + 1}); re-extract or re-normalise the particles, or remove those rows")


def _nonfinite_rows(images) -> np.ndarray:
    """Indices along the first axis of images holding any NaN/Inf."""
    try:
        import torch

        if isinstance(images, torch.Tensor):
            flat = images.reshape(images.shape[0], -1) if images.dim() else images.reshape(1, 1)
            if flat.is_complex():
                flat = torch.view_as_real(flat).reshape(flat.shape[0], -1)
            bad = ~torch.isfinite(flat).all(dim=1)
            return torch.nonzero(bad).reshape(-1).cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.asarray(images)
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    flat = arr.reshape(arr.shape[0], -1)
    if flat.dtype.kind not in "fc":
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(~np.isfinite(flat).all(axis=1))


# ----------------------------------------------------------------------------------- maps
def check_map(vol, apix: float, name: str = "map", min_box: int = MIN_MAP_BOX) -> None:
    """Refuse a map that is not 3D and cubic, too small, holds NaN/Inf, is empty (all zeros or
    one constant value), or has no positive pixel size. ``vol[z, y, x]``."""
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise InputError(f"{name}: a {vol.ndim}D array of shape {_fmt_shape(vol.shape)}, not a 3D map; give a 3D map")
    if len(set(vol.shape)) != 1:
        raise InputError(f"{name}: non-cubic map {_fmt_shape(vol.shape)} (x, y, z); pad or crop it to a cube")
    if vol.shape[0] < min_box:
        raise InputError(f"{name}: box of {vol.shape[0]} px is too small; give a map of at least {min_box} px")
    if vol.dtype.kind not in "fiub":
        raise InputError(f"{name}: values of type {vol.dtype}; give a real-valued map")
    if vol.dtype.kind == "f" and not np.isfinite(vol).all():
        n_bad = int((~np.isfinite(vol)).sum())
        raise InputError(f"{name}: {n_bad} NaN or Inf voxel(s); fix or regenerate the map")
    vmin, vmax = float(vol.min()), float(vol.max())
    if vmin == 0.0 and vmax == 0.0:
        raise InputError(f"{name}: the map is all zeros (empty); give the consensus map")
    if vmin == vmax:
        raise InputError(f"{name}: every voxel has the same value ({vmin:g}): the map is empty; give the consensus map")
    if not (isinstance(apix, (int, float, np.floating, np.integer)) and math.isfinite(float(apix))
            and float(apix) > 0):
        raise InputError(f"{name}: pixel size {apix} A is not a positive number; give the map's pixel size (--apix)")


def check_mask_matches(mask_shape, mask_apix: float | None, map_shape, map_apix: float, name: str = "mask",
                       map_name: str = "the map") -> None:
    """Refuse a mask on another grid than the map: other box, or other pixel size (0.1%).
    ``mask_apix=None`` skips the pixel-size check (mask header without one)."""
    mask_shape, map_shape = tuple(int(v) for v in mask_shape), tuple(int(v) for v in map_shape)
    if mask_shape != map_shape:
        raise InputError(f"{name}: box {_fmt_shape(mask_shape)} differs from {map_name}'s {_fmt_shape(map_shape)}; "
                         "resample the mask onto the map's grid (e.g. relion_image_handler --new_box/--rescale_angpix)")
    if mask_apix is not None and not same_apix(mask_apix, map_apix):
        raise InputError(f"{name}: pixel size {float(mask_apix):.4g} A differs from {map_name}'s "
                         f"{float(map_apix):.4g} A; "
                         "resample the mask onto the map's grid (e.g. relion_image_handler --rescale_angpix)")


def mask_grid_message(name: str, mask_shape, mask_apix: float | None, map_shape, map_apix: float,
                      map_name: str) -> str | None:
    """The refusal text of :func:`check_mask_matches` (None when the grids agree), for callers
    that collect errors (the protocols' ``_validate``)."""
    try:
        check_mask_matches(mask_shape, mask_apix, map_shape, map_apix, name, map_name)
    except InputError as exc:
        return str(exc)
    return None


def model_grid(train_or_gmm: str) -> tuple[int, float] | None:
    """``(box, apix)`` of the Gaussian model in a training folder, a build folder or a gmm.npz
    (read without torch, for the GUI); None when there is none or it cannot be read."""
    from .outputs import gmm_file
    path = gmm_file(train_or_gmm) if train_or_gmm else train_or_gmm
    if not path or not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return int(z["box"]), float(z["apix"])
    except Exception:  # unreadable: the command that loads it says so in one line
        return None


def check_particles_vs_map(meta, map_box: int, map_apix: float, allow_resample: bool = False,
                           model_extent_A: float | None = None, map_name: str = "the map") -> str | None:
    """Compare the particles' sampling with the map's (or the GMM's) -- see the module docstring.

    Returns ``None`` when box and pixel size agree; with ``allow_resample`` and a particle
    box that covers the model, a note to log (also logged here). Raises InputError otherwise.
    ``model_extent_A``: the model's diameter in Angstrom (default: the map's box,
    ``map_box * map_apix``, a conservative bound; a GMM's is ``2 * max(|centre| + 3 sigma)``).
    """
    box, apix = int(meta.box), float(meta.apix)
    map_box, map_apix = int(map_box), float(map_apix)
    if box == map_box and same_apix(apix, map_apix):
        return None
    what = (f"{meta.source}: particles are {box} px at {apix:.4g} A/px but {map_name} is {map_box} px at "
            f"{map_apix:.4g} A/px")
    if not allow_resample:
        new_box = int(round(map_box * map_apix / apix))
        raise InputError(f"{what}; resample the map to the particles' sampling (relion_image_handler --i map.mrc "
                         f"--angpix {map_apix:.4g} --rescale_angpix {apix:.4g} --new_box {box}) and rebuild the GMM"
                         + ("" if new_box == box else f" (the map's field of view is {new_box} px at the particles' "
                                                      "pixel size)"))
    extent_A = float(model_extent_A) if model_extent_A is not None else map_box * map_apix
    fov_A = box * apix
    if extent_A > fov_A * (1 + APIX_RTOL):
        raise InputError(f"{what}, and the model ({extent_A:.1f} A across) does not fit in the particle box "
                         f"({fov_A:.1f} A); re-extract the particles in a box of at least "
                         f"{int(math.ceil(extent_A / apix))} px or crop the map")
    note = (f"{what}: the Gaussian model is projected at the particles' sampling (it is continuous in Angstrom; "
            f"the {fov_A:.1f} A particle box holds the {extent_A:.1f} A model)")
    if apix < map_apix and not same_apix(apix, map_apix):
        note += f"; the model holds no detail finer than {2 * map_apix:.3g} A (the map's Nyquist)"
    log.info("%s", note)
    return note


def gmm_extent_A(centers_A, sigmas_A, n_sigma: float = 3.0) -> float:
    """Diameter (Angstrom) of the sphere about the box centre holding every Gaussian out to
    ``n_sigma`` widths: the ``model_extent_A`` of :func:`check_particles_vs_map`."""
    c = np.asarray(centers_A, dtype=np.float64).reshape(-1, 3)
    s = np.asarray(sigmas_A, dtype=np.float64).reshape(-1)
    if c.shape[0] == 0:
        return 0.0
    return float(2.0 * np.max(np.linalg.norm(c, axis=1) + n_sigma * np.abs(s)))


# ----------------------------------------------------------------------------------- settings
def check_zdim(k, name: str = "--zdim") -> int:
    """The latent dimension as an int >= 1 (InputError otherwise)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer, float, np.floating, str)):
        raise InputError(f"{name} {k!r}: the latent dimension must be a whole number >= 1; use e.g. {name} 4")
    try:
        value = float(k)
    except ValueError:
        raise InputError(f"{name} {k!r}: the latent dimension must be a whole number >= 1; use e.g. {name} 4") from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise InputError(f"{name} {k}: the latent dimension must be a whole number >= 1; use e.g. {name} 4")
    return int(value)


def check_focus_selects(n_selected: int, mask_name: str = "focus mask", n_total: int | None = None) -> None:
    """Refuse a focus mask that selects no Gaussian (nothing could change in training)."""
    if int(n_selected) < 1:
        of = f" of the {int(n_total)}" if n_total is not None else ""
        raise InputError(f"{mask_name}: selects none{of} Gaussians (no Gaussian centre where the mask is > 0.5); "
                         "give a mask that covers the region to analyse, on the map's box and pixel size")
