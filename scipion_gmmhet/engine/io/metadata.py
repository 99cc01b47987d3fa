"""Particle metadata in one canonical form: RELION 3.1 tables, whatever the source.

:func:`read_particles` reads RELION 3.0, 3.1, 4 and 5 star files and cryoSPARC ``.cs``
particle exports into a :class:`ParticleMetadata`: a RELION 3.1 particle table (row order
= input order) and an optics table. Units and conventions are RELION's (``conventions``):
Euler angles ``rlnAngleRot/Tilt/Psi`` in degrees, origins ``rlnOriginXAngst/YAngst`` in
Angstrom, defocus in Angstrom, ``rlnDefocusAngle`` and ``rlnPhaseShift`` in degrees.

RELION 3.0 (no optics table)
    Origins ``rlnOriginX/Y`` (pixels) become ``rlnOriginXAngst/YAngst``; the pixel size
    comes from ``apix=``, else ``rlnImagePixelSize``, else ``rlnDetectorPixelSize`` (um)
    * 1e4 / ``rlnMagnification``; voltage, Cs and amplitude contrast move to an optics table
    with one group per distinct combination.

cryoSPARC ``.cs`` (numpy structured array)
    Read by :mod:`cryosparc` (its docstring gives the pose and unit conventions).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import conventions
from ..errors import InputError
from .mrc import open_stack
from .star import read_star, write_star

ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGINS = ["rlnOriginXAngst", "rlnOriginYAngst"]
OPTICS_CTF = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
CTF_PARTICLE = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
                "rlnCtfScalefactor"]
# Xmipp/Scipion file-type hint after an image name ('000001@particles.mrcs:mrcs'): not part of the path.
_TYPE_SUFFIX = re.compile(r":mrcs?$", re.IGNORECASE)
# RELION 3.0 per-particle columns that live in the optics table from 3.1 on.
_OPTICS_30 = OPTICS_CTF + ["rlnImagePixelSize", "rlnDetectorPixelSize", "rlnMagnification",
                           "rlnImageSize", "rlnImageDimensionality", "rlnCtfDataAreCtfPremultiplied"]


@dataclass
class ParticleMetadata:
    """RELION 3.1 particle and optics tables plus the directory image names resolve against.

    ``particles`` always has ``rlnImageName``, ``rlnOpticsGroup`` (int) and
    ``rlnOriginXAngst/YAngst``; ``rlnAngleRot/Tilt/Psi`` when aligned; CTF columns when
    present; every other column untouched. ``optics`` has ``rlnOpticsGroup``,
    ``rlnOpticsGroupName``, ``rlnImagePixelSize``, ``rlnImageDimensionality``, usually
    ``rlnImageSize`` and, with CTF, ``rlnVoltage``, ``rlnSphericalAberration``,
    ``rlnAmplitudeContrast`` (optionally ``rlnCtfDataAreCtfPremultiplied``).
    ``source`` names the file the metadata came from (for messages).
    """

    particles: pd.DataFrame
    optics: pd.DataFrame
    root: str
    source: str = field(default="particles")

    def __len__(self) -> int:
        return len(self.particles)

    # ---------------------------------------------------------------- optics
    def _optics_rows(self) -> np.ndarray:
        """Row of ``optics`` for every particle (InputError for unknown groups)."""
        groups = self.optics["rlnOpticsGroup"].to_numpy()
        index = pd.Index(groups)
        if not index.is_unique:
            raise InputError(f"{self.source}: optics group numbers repeat in the optics table; "
                             "give each optics group its own number")
        pos = index.get_indexer(self.particles["rlnOpticsGroup"].to_numpy())
        if (pos < 0).any():
            missing = sorted(set(self.particles["rlnOpticsGroup"].to_numpy()[pos < 0].tolist()))
            raise InputError(f"{self.source}: rlnOpticsGroup {missing} used by particles but absent "
                             "from the optics table; fix the star file's data_optics block")
        return pos

    def _uniform(self, column: str, what: str, unit: str):
        if column not in self.optics.columns:
            raise InputError(f"{self.source}: no {column} in the optics table; "
                             f"add the {what} to the star file")
        used = self.optics.iloc[np.unique(self._optics_rows())] if len(self) else self.optics
        values = used[column].to_numpy()
        if len(values) == 0:
            raise InputError(f"{self.source}: empty optics table; give a particle star file")
        if not np.allclose(values.astype(float), float(values[0]), rtol=1e-6, atol=0):
            names = used["rlnOpticsGroupName"] if "rlnOpticsGroupName" in used else used["rlnOpticsGroup"]
            desc = ", ".join(f"{n}: {float(v):g}{unit}" for n, v in zip(names, values))
            raise InputError(f"{self.source}: optics groups have different {what}s ({desc}); "
                             f"the engine needs one {what}: rescale/re-extract the particles or "
                             "select one optics group")
        return values[0]

    @property
    def apix(self) -> float:
        """Pixel size of the images in Angstrom (InputError if optics groups disagree)."""
        return float(self._uniform("rlnImagePixelSize", "pixel size", " A"))

    @property
    def box(self) -> int:
        """Image size in pixels (InputError if optics groups disagree or it is unknown)."""
        box = int(self._uniform("rlnImageSize", "image size", " px"))
        if box < 1:
            raise InputError(f"{self.source}: rlnImageSize {box} is not a valid image size; fix the optics table")
        return box

    # ---------------------------------------------------------------- poses
    def has_alignment_3d(self) -> bool:
        return all(c in self.particles.columns for c in ANGLES)

    def has_ctf(self) -> bool:
        return "rlnDefocusU" in self.particles.columns and all(c in self.optics.columns for c in OPTICS_CTF)

    def euler_deg(self) -> np.ndarray:
        """``(N, 3)`` float64 rot, tilt, psi in degrees (RELION ZYZ)."""
        if not self.has_alignment_3d():
            missing = [c for c in ANGLES if c not in self.particles.columns]
            raise InputError(f"{self.source}: no 3D alignment (missing {', '.join(missing)}); "
                             "give particles from a 3D refinement")
        return self.particles[ANGLES].to_numpy(dtype=np.float64)

    def rotation_matrices(self) -> np.ndarray:
        """``(N, 3, 3)`` RELION matrices ``A`` (``conventions.euler_to_matrix``)."""
        e = self.euler_deg()
        return conventions.euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])

    def origins_A(self) -> np.ndarray:
        """``(N, 2)`` float64 ``rlnOriginXAngst, rlnOriginYAngst`` (Angstrom)."""
        return self.particles[ORIGINS].to_numpy(dtype=np.float64)

    # ---------------------------------------------------------------- CTF
    def _particle_col(self, name: str, default: float) -> np.ndarray:
        if name in self.particles.columns:
            return self.particles[name].to_numpy(dtype=np.float64)
        return np.full(len(self), default, dtype=np.float64)

    def ctf_params(self) -> dict[str, np.ndarray]:
        """Per-particle CTF parameters ``(N,)`` float64, optics values broadcast by group.

        Keys: ``defocus_u_A``, ``defocus_v_A``, ``defocus_angle_deg``, ``voltage_kv``,
        ``cs_mm``, ``amplitude_contrast``, ``phase_shift_deg``, ``bfactor``, ``scale``
        (missing optional values: V = U, angle/phase/B = 0, scale = 1).
        """
        if not self.has_ctf():
            missing = [c for c in ["rlnDefocusU"] if c not in self.particles.columns]
            missing += [c for c in OPTICS_CTF if c not in self.optics.columns]
            raise InputError(f"{self.source}: no CTF parameters (missing {', '.join(missing)}); "
                             "give particles with CTF estimates")
        rows = self._optics_rows()
        opt = {c: self.optics[c].to_numpy(dtype=np.float64)[rows] for c in OPTICS_CTF}
        du = self._particle_col("rlnDefocusU", 0.0)
        return {
            "defocus_u_A": du,
            "defocus_v_A": self._particle_col("rlnDefocusV", 0.0) if "rlnDefocusV" in self.particles else du.copy(),
            "defocus_angle_deg": self._particle_col("rlnDefocusAngle", 0.0),
            "voltage_kv": opt["rlnVoltage"],
            "cs_mm": opt["rlnSphericalAberration"],
            "amplitude_contrast": opt["rlnAmplitudeContrast"],
            "phase_shift_deg": self._particle_col("rlnPhaseShift", 0.0),
            "bfactor": self._particle_col("rlnCtfBfactor", 0.0),
            "scale": self._particle_col("rlnCtfScalefactor", 1.0),
        }

    def ctf_premultiplied(self) -> np.ndarray:
        """``(N,)`` bool: images already multiplied by their CTF (RELION 4/5 optics flag)."""
        if "rlnCtfDataAreCtfPremultiplied" not in self.optics.columns:
            return np.zeros(len(self), dtype=bool)
        flag = self.optics["rlnCtfDataAreCtfPremultiplied"].to_numpy(dtype=np.float64) != 0
        return flag[self._optics_rows()]

    # ---------------------------------------------------------------- images
    def image_locations(self) -> tuple[np.ndarray, np.ndarray]:
        """Absolute stack paths ``(N,)`` (object) and 0-based indices ``(N,)`` int64.

        An Xmipp/Scipion file-type hint after the stack name (``000001@particles.mrcs:mrcs``,
        ``:mrc``) is dropped: it is not part of the path."""
        if len(self.particles) == 0:  # str.partition of an empty Series has no columns
            return np.zeros(0, dtype=object), np.zeros(0, dtype=np.int64)
        names = self.particles["rlnImageName"].astype(str)
        split = names.str.partition("@")
        has_at = split[1] == "@"
        idx_txt = split[0].where(has_at, "1")
        rel = split[2].where(has_at, names).str.replace(_TYPE_SUFFIX, "", regex=True)
        idx = pd.to_numeric(idx_txt, errors="coerce")
        if idx.isna().any() or (idx % 1 != 0).any():
            bad = names[idx.isna() | (idx % 1 != 0)].iloc[0]
            raise InputError(f"{self.source}: rlnImageName {bad!r} is not 'index@stack'; "
                             "fix the image names")
        codes, uniq = pd.factorize(rel)
        resolved = np.array([os.path.abspath(os.path.join(self.root, p)) for p in uniq] + [""], dtype=object)
        return resolved[codes][: len(codes)], idx.to_numpy(np.int64) - 1

    def particle_keys(self, kind: str = "auto") -> np.ndarray:
        """The identity of each particle row ``(N,)`` str, to pair results with particles
        (never by row position): ``id:<rlnGmmhetParticleId>`` (Scipion's particle id) when the
        column is present (``kind`` ``"auto"`` or ``"id"``), else (``kind`` ``"image"``) the
        image: ``img:<index>@<stack>`` with the 1-based index as an integer and the stack's
        absolute real path (``1@x.mrcs``, ``000001@x.mrcs``, a relative path and a link to the
        same file give one key). Reads no image data."""
        if kind == "auto":
            kind = "id" if "rlnGmmhetParticleId" in self.particles.columns else "image"
        if kind == "id":
            ids = self.particles["rlnGmmhetParticleId"].reset_index(drop=True)
            num = pd.to_numeric(ids, errors="coerce")
            text = ids.astype(str).str.strip()
            whole = (num.notna() & (num % 1 == 0)).to_numpy()  # 12, 12.0 and 000012 are one id
            text[whole] = num[whole].astype(np.int64).astype(str)
            keys = ["id:" + _line_safe(t) for t in text.tolist()]
        elif kind == "image":
            paths, idx = self.image_locations()
            codes, uniq = pd.factorize(paths)
            real = [_line_safe(os.path.realpath(p)) for p in uniq]
            keys = [f"img:{i + 1}@{real[c]}" for i, c in zip(idx.tolist(), codes.tolist())]
        else:
            raise ValueError(f"particle_keys: kind {kind!r} is not auto, id or image")
        return np.array(keys, dtype=object)  # object: a million long paths as fixed-width text would be huge

    # ---------------------------------------------------------------- derive
    def subset(self, rows: np.ndarray) -> "ParticleMetadata":
        """Particles ``rows`` (in that order, index reset); the optics table is kept whole."""
        rows = np.asarray(rows)
        return ParticleMetadata(self.particles.iloc[rows].reset_index(drop=True),
                                self.optics.copy(), self.root, self.source)

    def with_poses(self, euler_deg=None, origins_A=None) -> "ParticleMetadata":
        """Copy with new ``(N, 3)`` Euler angles (degrees) and/or ``(N, 2)`` origins (Angstrom)."""
        particles = self.particles.copy()
        n = len(particles)
        if euler_deg is not None:
            e = np.asarray(euler_deg, dtype=np.float64)
            if e.shape != (n, 3):
                raise ValueError(f"euler_deg must be ({n}, 3), got {e.shape}")
            for i, c in enumerate(ANGLES):
                particles[c] = e[:, i]
        if origins_A is not None:
            o = np.asarray(origins_A, dtype=np.float64)
            if o.shape != (n, 2):
                raise ValueError(f"origins_A must be ({n}, 2), got {o.shape}")
            for i, c in enumerate(ORIGINS):
                particles[c] = o[:, i]
        return ParticleMetadata(particles, self.optics.copy(), self.root, self.source)

    # ---------------------------------------------------------------- checks
    def validate(self, require_alignment: bool = True, require_ctf: bool = True,
                 check_images: bool = True, allow_duplicates: bool = False) -> None:
        """Raise a one-line InputError for anything the engine cannot use.

        Checks: particles present; required columns; every rlnOpticsGroup in the optics
        table; unique images (unless ``allow_duplicates``: symmetry-expanded stars repeat
        images); finite poses and CTF (every CTF column of the particle table, and the voltage,
        Cs and amplitude contrast of the optics groups in use); with ``check_images``, every stack exists, is a
        readable MRC whose image size matches the optics table, and holds every index used
        (each stack's header is read once).
        """
        src = self.source
        if len(self) == 0:
            raise InputError(f"{src}: no particles; give a star file with particle rows")
        if "rlnImageName" not in self.particles.columns:
            raise InputError(f"{src}: no rlnImageName column; give a particle star file")
        rows = self._optics_rows()
        if require_alignment:
            self.euler_deg()
        if require_ctf:
            self.ctf_params()
        checks = [c for c in ANGLES + ORIGINS if c in self.particles.columns]
        if require_ctf:  # every CTF column the CTF is computed from (ctf_params), not only the defocus
            checks += [c for c in CTF_PARTICLE if c in self.particles.columns]
        for c in checks:
            v = pd.to_numeric(self.particles[c], errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isfinite(v)
            if bad.any():
                i = int(np.argmax(bad))
                raise InputError(f"{src}: {c} is not a finite number for {int(bad.sum())} particle(s) "
                                 f"(first: row {i + 1} of the particle table, "
                                 f"{self.particles['rlnImageName'].iloc[i]}); remove or fix those particles")
        if require_ctf:
            self._check_optics_ctf(rows)
        paths, idx = self.image_locations()
        if (idx < 0).any():
            i = int(np.argmax(idx < 0))
            raise InputError(f"{src}: image index below 1 in {self.particles['rlnImageName'].iloc[i]!r}; "
                             "RELION image indices start at 1")
        if not allow_duplicates:
            keys = pd.DataFrame({"p": paths, "i": idx})
            dup = keys.duplicated(keep=False).to_numpy()
            if dup.any():
                first = self.particles["rlnImageName"].to_numpy()[dup][0]
                raise InputError(f"{src}: {int(keys.duplicated().sum())} duplicate particle image(s) "
                                 f"(e.g. {first}); remove duplicates (symmetry-expanded stars are "
                                 "expanded by the engine itself)")
        if check_images:
            self._check_stacks(paths, idx, rows)

    def _check_optics_ctf(self, rows: np.ndarray) -> None:
        """Refuse NaN/Inf voltage, Cs or amplitude contrast (and a voltage <= 0) in the optics
        groups the particles use (``rows``: optics row of every particle)."""
        used, count = np.unique(rows, return_counts=True)
        names = (self.optics["rlnOpticsGroupName"] if "rlnOpticsGroupName" in self.optics.columns
                 else self.optics["rlnOpticsGroup"]).astype(str).to_numpy()
        for c in OPTICS_CTF:
            if c not in self.optics.columns:
                continue
            v = pd.to_numeric(self.optics[c], errors="coerce").to_numpy(dtype=np.float64)[used]
            bad = ~np.isfinite(v) | ((v <= 0) if c == "rlnVoltage" else False)
            if bad.any():
                k = int(np.argmax(bad))
                what = "not a positive number" if c == "rlnVoltage" else "not a finite number"
                raise InputError(f"{self.source}: {c} is {what} in {int(bad.sum())} optics group(s) (first: "
                                 f"row {int(used[k]) + 1} of the optics table, group {names[used[k]]}, used by "
                                 f"{int(count[k])} particle(s)); fix the data_optics block")

    def _check_stacks(self, paths: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> None:
        src = self.source
        size = (self.optics["rlnImageSize"].to_numpy()[rows] if "rlnImageSize" in self.optics.columns
                else np.full(len(self), -1))
        table = pd.DataFrame({"p": paths, "i": idx, "s": size})
        for path, g in table.groupby("p", sort=False):
            if not os.path.exists(path):
                raise InputError(f"{src}: image stack {path} not found ({len(g)} particles use it); "
                                 f"write a star whose image names resolve: gmmhet convert {src} "
                                 "--images-root DIR_OF_THE_STACKS --out fixed.star, then give fixed.star")
            stack = open_stack(path)
            n, d = stack.shape[0], stack.shape[1]
            del stack
            last = int(g["i"].max())
            if last >= n:
                raise InputError(f"{src}: image {last + 1}@{path} is past the end of the stack "
                                 f"({n} images); the star file and stack do not match")
            sizes = set(int(s) for s in g["s"].unique() if s >= 0)
            if sizes and sizes != {d}:
                raise InputError(f"{src}: {path} holds {d} x {d} px images but the optics table says "
                                 f"rlnImageSize {sorted(sizes)[0]}; the star file and stack do not match")


def _line_safe(text: str) -> str:
    """``text`` as one line of UTF-8 (a key file holds one key per line): line breaks and
    undecodable bytes of a file name escaped."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r")


def particle_keys(meta: ParticleMetadata, kind: str = "auto") -> np.ndarray:
    """The identity of each particle row of ``meta`` (:meth:`ParticleMetadata.particle_keys`)."""
    return meta.particle_keys(kind)


# -------------------------------------------------------------------- reading
def _find_root(base_dir: str, first_rel: str | None) -> str:
    """Directory that relative image names resolve against: ``base_dir`` or the first of
    its ancestors (then the working directory) holding the first stack (RELION names are
    relative to the project directory, cryoSPARC's to the project directory too)."""
    base_dir = os.path.abspath(base_dir)
    if not first_rel or os.path.isabs(first_rel):
        return base_dir
    d = base_dir
    for _ in range(6):
        if os.path.exists(os.path.join(d, first_rel)):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    if os.path.exists(os.path.join(os.getcwd(), first_rel)):
        return os.getcwd()
    return base_dir


def _first_stack(names: pd.Series) -> str | None:
    if len(names) == 0:
        return None
    name = str(names.iloc[0])
    return _TYPE_SUFFIX.sub("", name.partition("@")[2] if "@" in name else name)


def _numeric(table: pd.DataFrame, columns: list[str], path: str, what: str) -> pd.DataFrame:
    """Columns the engine computes with must hold numbers: float64/int64 or InputError."""
    table = table.copy()
    for c in columns:
        if c in table.columns and table[c].dtype.kind not in "iuf":
            v = pd.to_numeric(table[c], errors="coerce")
            bad = v.isna() & ~table[c].astype(str).str.lower().isin(["nan", "-nan", "+nan"])
            if bad.any():
                i = int(np.argmax(bad.to_numpy()))
                raise InputError(f"{path}: {c} value {str(table[c].iloc[i])!r} (row {i + 1} of the {what} "
                                 "table) is not a number; fix the star file")
            table[c] = v.to_numpy(dtype=np.float64)
    return table


def _pick_particles(blocks: dict[str, pd.DataFrame], path: str) -> pd.DataFrame:
    if "particles" in blocks:
        return blocks["particles"]
    candidates = [k for k, v in blocks.items() if "rlnImageName" in v.columns and k != "optics"]
    if not candidates:
        raise InputError(f"{path}: no particle table (no block with rlnImageName); "
                         "give a RELION particle star file (e.g. run_data.star)")
    for k in ("", "images"):
        if k in candidates:
            return blocks[k]
    if len(candidates) > 1:
        raise InputError(f"{path}: several blocks hold particles ({', '.join('data_' + c for c in candidates)}); "
                         "keep only the particle block")
    return blocks[candidates[0]]


def _stack_box(root: str, names: pd.Series) -> int | None:
    first = _first_stack(names)
    if first is None:
        return None
    p = first if os.path.isabs(first) else os.path.join(root, first)
    try:
        return int(open_stack(p).shape[1])
    except InputError:
        return None


def _group(keys: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Distinct rows of ``keys`` in order of appearance -> (0-based code per row, distinct rows)."""
    codes = keys.groupby(list(keys.columns), sort=False, dropna=False).ngroup().to_numpy()
    uniques = keys.drop_duplicates().reset_index(drop=True)
    return codes.astype(np.int64), uniques


def _as_float64(a) -> np.ndarray:
    """float32 values -> float64 holding their shortest decimal repr (1.345, not 1.34500012)."""
    a = np.asarray(a)
    if a.dtype == np.float32:
        return a.astype(str).astype(np.float64)
    return a.astype(np.float64)


def _optics_from_30(particles: pd.DataFrame, apix: float | None, path: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.0: move optics columns out of the particle table and group them."""
    n = len(particles)
    if apix is not None:
        px = np.full(n, float(apix))
    elif "rlnImagePixelSize" in particles.columns:
        px = particles["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(particles.columns):
        px = (particles["rlnDetectorPixelSize"].to_numpy(dtype=np.float64) * 1e4
              / particles["rlnMagnification"].to_numpy(dtype=np.float64))
    else:
        raise InputError(f"{path}: RELION 3.0 star without pixel size (no rlnImagePixelSize or "
                         "rlnDetectorPixelSize/rlnMagnification); give the pixel size (--apix)")
    if not (np.isfinite(px).all() and (px > 0).all()):
        raise InputError(f"{path}: pixel size is not a positive number for some particles; "
                         "give the pixel size (--apix)")
    keys = pd.DataFrame({"rlnImagePixelSize": np.round(px, 6)})
    for c in OPTICS_CTF + ["rlnImageSize", "rlnCtfDataAreCtfPremultiplied"]:
        if c in particles.columns:
            keys[c] = particles[c].to_numpy()
    codes, optics = _group(keys)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1, dtype=np.int64))
    optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{i}" for i in optics["rlnOpticsGroup"]])
    parts = particles.drop(columns=[c for c in _OPTICS_30 if c in particles.columns])
    if "rlnOpticsGroup" in parts.columns:
        parts = parts.drop(columns=["rlnOpticsGroup"])
    parts["rlnOpticsGroup"] = (codes + 1).astype(np.int64)
    return parts, optics


def _canonical(particles: pd.DataFrame, optics: pd.DataFrame, root: str, path: str) -> ParticleMetadata:
    particles = particles.reset_index(drop=True).copy()
    optics = optics.reset_index(drop=True).copy()
    if "rlnImageName" not in particles.columns:
        raise InputError(f"{path}: no rlnImageName column; give a particle star file")
    particles["rlnImageName"] = particles["rlnImageName"].astype(str)
    if "rlnOpticsGroup" not in optics.columns:
        if len(optics) != 1:
            raise InputError(f"{path}: optics table without rlnOpticsGroup; fix the data_optics block")
        optics.insert(0, "rlnOpticsGroup", np.array([1], dtype=np.int64))
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise InputError(f"{path}: particles have no rlnOpticsGroup but there are {len(optics)} "
                             "optics groups; add rlnOpticsGroup to the particles")
        particles["rlnOpticsGroup"] = optics["rlnOpticsGroup"].iloc[0]
    for table, name in ((particles, "particles"), (optics, "optics")):
        g = pd.to_numeric(table["rlnOpticsGroup"], errors="coerce")
        if g.isna().any() or (g % 1 != 0).any():
            raise InputError(f"{path}: rlnOpticsGroup in the {name} table is not an integer; "
                             "fix the star file")
        table["rlnOpticsGroup"] = g.to_numpy().astype(np.int64)
    if "rlnOpticsGroupName" not in optics.columns:
        optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]])
    optics["rlnOpticsGroupName"] = optics["rlnOpticsGroupName"].astype(str)
    if "rlnImagePixelSize" not in optics.columns:
        raise InputError(f"{path}: no rlnImagePixelSize in the optics table; add the pixel size")
    if "rlnImageSize" not in optics.columns:
        box = _stack_box(root, particles["rlnImageName"])
        if box is not None:
            optics["rlnImageSize"] = np.int64(box)
    for c in ("rlnImageSize", "rlnImageDimensionality", "rlnCtfDataAreCtfPremultiplied"):
        if c in optics.columns:
            v = pd.to_numeric(optics[c], errors="coerce").to_numpy(dtype=np.float64)
            if not (np.isfinite(v).all() and (v % 1 == 0).all() and (v >= 0).all()):
                raise InputError(f"{path}: {c} in the optics table is not a whole number; fix the star file")
            optics[c] = v.astype(np.int64)
    if "rlnImageDimensionality" not in optics.columns:
        optics["rlnImageDimensionality"] = np.int64(2)
    px = pd.to_numeric(optics["rlnImagePixelSize"], errors="coerce").to_numpy(dtype=np.float64)
    if not (np.isfinite(px) & (px > 0)).all():
        raise InputError(f"{path}: rlnImagePixelSize is not a positive number; fix it or give --apix")
    optics["rlnImagePixelSize"] = px
    meta = ParticleMetadata(particles, optics, root, path)
    if not set(ORIGINS) <= set(particles.columns):
        if {"rlnOriginX", "rlnOriginY"} <= set(particles.columns):  # pixels (RELION 3.0)
            px_part = px[meta._optics_rows()]
            for c in ("X", "Y"):
                v = pd.to_numeric(particles[f"rlnOrigin{c}"], errors="coerce").to_numpy(dtype=np.float64)
                particles[f"rlnOrigin{c}Angst"] = v * px_part
            meta.particles = particles.drop(columns=["rlnOriginX", "rlnOriginY"])
        else:
            for c in ORIGINS:
                particles[c] = 0.0
    return meta


def _read_relion(path: str, images_root: str | None, apix: float | None) -> ParticleMetadata:
    blocks = read_star(path)
    particles = _pick_particles(blocks, path)
    if "rlnImageName" not in particles.columns:
        raise InputError(f"{path}: no rlnImageName column in data_particles; give a particle star file")
    root = os.path.abspath(images_root) if images_root else _find_root(
        os.path.dirname(os.path.abspath(path)), _first_stack(particles["rlnImageName"].astype(str)))
    particles = _numeric(particles, ANGLES + ORIGINS + CTF_PARTICLE + _OPTICS_30 +
                         ["rlnOriginX", "rlnOriginY", "rlnOpticsGroup"], path, "particles")
    if "optics" in blocks:
        optics = _numeric(blocks["optics"], _OPTICS_30 + ["rlnOpticsGroup"], path, "optics")
        if apix is not None:
            optics["rlnImagePixelSize"] = float(apix)
    else:
        particles, optics = _optics_from_30(particles, apix, path)
    return _canonical(particles, optics, root, path)


def read_particles(path, images_root: str | None = None, apix: float | None = None) -> ParticleMetadata:
    """Read RELION 3.0/3.1/4/5 ``.star`` or cryoSPARC ``.cs`` particles (module docstring).

    ``images_root``: directory relative image names resolve against (default: the file's
    directory, or the first ancestor directory holding the first stack). ``apix``:
    pixel size in Angstrom, overriding the file's (needed for RELION 3.0 stars without one).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file; check the path")
    if apix is not None and not apix > 0:
        raise InputError(f"{path}: pixel size {apix} is not positive; give --apix in Angstrom")
    if path.lower().endswith(".cs"):
        from .cryosparc import read_cs
        return read_cs(path, images_root, apix)
    return _read_relion(path, images_root, apix)


def write_particles(path, meta: ParticleMetadata) -> None:
    """Write the canonical RELION 3.1 star (optics + particles), atomically.

    Image names are rewritten as ``NNNNNN@stack`` with the stack path relative to the
    output star's directory when the stack lies inside it, absolute otherwise, so the star
    reads back from any working directory.
    """
    path = os.fspath(path)
    out_dir = os.path.dirname(os.path.abspath(path))
    paths, idx = meta.image_locations()
    inverse, uniq = pd.factorize(paths)
    shown = []
    for p in uniq:
        rel = os.path.relpath(p, out_dir)
        shown.append(p if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel) else rel)
    shown = np.array(shown + [""], dtype=object)
    particles = meta.particles.copy()
    particles["rlnImageName"] = [f"{i + 1:06d}@{p}" for i, p in zip(idx.tolist(), shown[inverse].tolist())]
    write_star(path, {"optics": meta.optics, "particles": particles})
