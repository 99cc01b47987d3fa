"""Simulated datasets from a real atomic structure moved as rigid domains: the science benchmarks.

The structure
    Heavy atoms of the first chain of a PDB file (adenylate kinase, PDB 1AKE, in the tests'
    data), each an isotropic Gaussian of width ``ATOM_SIGMA_A`` (1.2 A) and peak density its
    number of electrons, centred (Angstrom, xyz from the box centre, as :mod:`gmm`) on the
    structure's centroid in the middle of its motion. Domains by residue number (1AKE's):
    ``LID`` 122-159, ``NMP`` 30-59, ``CORE`` the rest.

Motions (``system``)
    Each moving domain turns rigidly about a hinge axis through the C-alpha atoms of its first
    and last residues (the two points where its chain joins the core, so the linkers stay put);
    the sign is chosen so a positive angle moves the domain's centroid away from the core's
    (opening). ``hinge``: one coordinate ``c`` uniform in [0, 1] opens LID by ``c * 45`` and
    NMP by ``c * 30`` degrees together (1AKE is the closed state; the open 4AKE is about that
    far). ``two_motions``: LID and NMP open independently, ``motion_lid`` and ``motion_nmp``
    uniform in [0, 1] (45 and 30 degrees end to end). ``cyclic``: LID, lifted ``CYCLIC_LIFT_A`` (6 A) away
    from the core on a stalk, turns a full circle (``angle_deg`` uniform in [0, 360)) about the
    core -> LID centroid direction through its hinge point; its centroid runs round a circle of
    about 10 A radius (few atoms within 3 A of the rest at any angle). ``trajectory``: the
    frames of a molecular-dynamics trajectory, the MODELs of one PDB file in order (any protein;
    e.g. written by MDAnalysis, mdtraj or ``gmx trjconv``), superposed on the middle frame by all
    atoms (electron-weighted Kabsch); each particle is one frame drawn uniformly, ``conformation``
    = frame / (frames - 1) and ``frame`` (0-based) in ``truth.csv``; no domains.

Thermal fluctuations (``thermal_A``, default 0: rigid domains only)
    Molecular-dynamics-like disorder on top of the motion: every particle's atoms are displaced
    by a random field of RMS ``thermal_A`` (Angstrom per atom and axis summed, i.e. the RMSF):
    80% of the variance shared by each residue's atoms and smoothed along the chain (Gaussian
    kernel of ``THERMAL_CHAIN_RESIDUES`` residues), 20% independent per atom. The field is drawn
    from the simulation seed and the particle number, so it is reproducible. Like the frames of a
    molecular-dynamics trajectory superposed on a reference before simulating images, each
    particle's field has its rigid-body part removed (the electron-weighted Kabsch superposition
    of its atoms onto the unfluctuated ones), so the particle's pose is the true pose of
    its fluctuated atoms (a random field of 1 A RMS on 1AKE otherwise turns the molecule by a
    median 0.6 deg and moves it by 0.14 A, a pose error no refinement could remove). The
    fluctuation left is 0.97 A RMS for 1 A asked. The consensus map
    is rendered with the atoms widened by the fluctuation (sigma^2 + thermal^2 / 3); the truth
    maps and GMMs stay the mean structure at each state.

Frame of the true poses (``frame``, :data:`FRAMES`)
    ``core`` (default): the core never moves and the domains turn about it. ``all``: every
    conformation is superposed on the middle state by all atoms (electron-weighted Kabsch), as
    molecular-dynamics frames usually are; the core then turns (up to ~3 deg across the 1AKE
    hinge) and moves (~0.5 A) with the motion, and the true poses are those of that frame.

Particles and files
    As :mod:`simulate`: uniform random poses, origin shifts, CTF (300 kV), white noise at
    ``snr``; ``particles.star`` + ``particles.mrcs``, ``consensus.mrc`` (population mean:
    the moving domains averaged over a histogram of the truth coordinates), ``truth.csv``
    (``particle``, ``conformation`` = the first truth coordinate, ``composition`` = 0, the
    system's coordinates (``motion_lid``, ``motion_nmp``; cyclic: ``turn`` = angle / 360 and ``angle_deg``), pose, shift, defocus, ``image_name``), ``truth_maps/*.mrc`` and
    ``truth_gmm/*.npz`` at a few states, ``simulation.json`` (parameters, domains' Gaussian
    masks as residue ranges, hinge axes, the truth columns).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..conventions import ctf_2d, euler_to_matrix, fourier_grid, fourier_to_image
from ..errors import InputError
from ..io.atomic import atomic_write, write_text
from ..io.mrc import write_map
from ..model.gmm import GMM, project, render_map
from .simulate import AMPLITUDE_CONTRAST, CS_MM, VOLTAGE_KV, _star_tables, draw_particles
from .stack import write_stack

log = logging.getLogger(__name__)

SYSTEMS = ("hinge", "two_motions", "cyclic", "trajectory")
ATOM_SIGMA_A = 1.2
ELECTRONS = {"C": 6, "N": 7, "O": 8, "S": 16, "P": 15, "SE": 34}
DOMAIN_RESIDUES = {"LID": (122, 159), "NMP": (30, 59)}   # adenylate kinase (1AKE) numbering
OPENING_DEG = {"LID": 45.0, "NMP": 30.0}
CYCLIC_LIFT_A = 6.0
STATE_MAPS = {"hinge": 5, "two_motions": 3, "cyclic": 8, "trajectory": 5}   # maps per coordinate
CONSENSUS_BINS = {1: 24, 2: 8}                              # histogram bins per coordinate
THERMAL_CHAIN_RESIDUES = 2.0                                # smoothing of the thermal field along the chain
THERMAL_SHARED = 0.8                                        # fraction of its variance shared per residue
#: the frame of each particle's true pose: ``core`` (the core never moves; the domains turn about
#: it), ``all`` (each conformation superposed on the middle state by all atoms, electron-weighted
#: Kabsch, as molecular-dynamics frames usually are before images are made: the core then turns
#: by up to ~3 deg and moves by ~0.5 A across the 1AKE hinge motion)
FRAMES = ("core", "all")


def read_pdb(path: str, all_models: bool = False) -> dict:
    """Heavy atoms of the first model and first chain of a PDB file: ``{'xyz_A' (N, 3),
    'electrons' (N,), 'resseq' (N,) int, 'name' (N,) atom names, 'chain'}`` (alternate
    locations other than blank/A dropped); ``all_models``: also ``'frames_A'`` ``(F, N, 3)``, the
    same atoms in every MODEL (the frames of a trajectory)."""
    if not os.path.isfile(path):
        raise InputError(f"--pdb {path}: no such file; give a PDB file (e.g. tests/data/1ake.pdb)")
    models, xyz, ids, el, chain = [], [], [], [], None   # per model: (coordinates, (residue, atom name))
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("ENDMDL"):
                if xyz:
                    models.append((np.asarray(xyz, np.float64), ids))
                    xyz, ids = [], []
                if not all_models:
                    break
                continue
            if not line.startswith(("ATOM", "HETATM")) or line.startswith("HETATM"):
                continue
            if line[16] not in (" ", "A"):
                continue
            chain = line[21] if chain is None else chain
            if line[21] != chain:
                continue
            e = line[76:78].strip().upper() or line[12:14].strip().upper()
            if e in ("H", "D"):
                continue
            try:
                xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
                ids.append((int(line[22:26]), line[12:16].strip()))
            except ValueError:
                raise InputError(f"--pdb {path}: unreadable ATOM line {line.rstrip()!r}; give a standard PDB file")
            if not models:
                el.append(ELECTRONS.get(e, 6))
    if xyz:
        models.append((np.asarray(xyz, np.float64), ids))
    if not models or len(models[0][1]) < 10:
        raise InputError(f"--pdb {path}: {len(models[0][1]) if models else 0} heavy atoms found; give a PDB file of "
                         "a protein chain")
    first = models[0][1]
    for k, (_, m) in enumerate(models[1:], 2):
        if m != first:
            what = (f"model {k} has {len(m)} heavy atoms, model 1 {len(first)}" if len(m) != len(first) else
                    "model %d's atom %d is residue %d %s, model 1's residue %d %s" % next(
                        (k, a + 1, *m[a], *first[a]) for a in range(len(m)) if m[a] != first[a]))
            raise InputError(f"--pdb {path}: {what}; give the frames of one trajectory (the same atoms in the "
                             "same order in every MODEL)")
    res, names = zip(*first)
    models = [m[0] for m in models]
    out = {"xyz_A": models[0], "electrons": np.asarray(el, np.float32), "resseq": np.asarray(res),
           "name": np.asarray(names), "chain": chain}
    if all_models:
        out["frames_A"] = np.stack(models)
    return out


def _rotation(axis: np.ndarray, theta: torch.Tensor) -> torch.Tensor:
    """Rodrigues rotation matrices ``(B, 3, 3)`` about unit ``axis`` by ``theta`` ``(B,)`` rad."""
    u = torch.as_tensor(axis, dtype=torch.float64)
    K = torch.tensor([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]], dtype=torch.float64)
    s, c = torch.sin(theta)[:, None, None], torch.cos(theta)[:, None, None]
    return torch.eye(3, dtype=torch.float64) + s * K + (1.0 - c) * (K @ K)


@dataclass
class DomainMotion:
    """A rigid rotation of the atoms ``atoms`` (bool ``(N,)``) about the line through
    ``pivot_A`` along unit ``axis`` by ``degrees * t`` with ``t = coords[:, coord]``, then
    translated by ``lift_A`` (Angstrom, ``(3,)``)."""

    name: str
    atoms: np.ndarray
    pivot_A: np.ndarray
    axis: np.ndarray
    degrees: float
    coord: int
    lift_A: np.ndarray | None = None


@dataclass
class AtomicSystem:
    """Atoms (``centers_A`` at all coordinates 0, ``electrons``) and their ``motions``, driven by
    truth coordinates ``coords`` (names) in [0, 1]; ``cyclic``: the coordinate is an angle / 360."""

    name: str
    centers_A: np.ndarray
    electrons: np.ndarray
    domain: np.ndarray          # (N,) names: CORE, LID, NMP
    motions: list
    coords: tuple
    cyclic: bool = False
    residue: np.ndarray | None = None   # (N,) residue numbers (thermal fluctuations)
    frame: str = "core"                 # see FRAMES
    frames_A: np.ndarray | None = None  # (F, N, 3) trajectory frames, superposed (system ``trajectory``)
    _reference: torch.Tensor | None = field(default=None, init=False, repr=False)  # middle state, frame all

    def centers(self, coords) -> torch.Tensor:
        """Atom centres ``(B, N, 3)`` float32 (Angstrom) at truth coordinates ``(B, n_coords)``, in
        the system's ``frame`` (:data:`FRAMES`)."""
        out = self._moved(coords)
        if self.frame == "all" and self.frames_A is None:   # trajectory frames come superposed
            from ..analysis.refine import remove_rigid_motion  # the weighted Kabsch fit refinement uses
            if self._reference is None:
                self._reference = self._moved(np.full((1, len(self.coords)), 0.5))[0]
            out = remove_rigid_motion(out, self._reference, torch.as_tensor(self.electrons, dtype=torch.float64),
                                      iterations=1)
        return out.float()

    def _moved(self, coords) -> torch.Tensor:
        """Atom centres ``(B, N, 3)`` float64 with the domains moved and the core fixed."""
        t = torch.as_tensor(np.asarray(coords, np.float64)).reshape(-1, len(self.coords))
        if self.frames_A is not None:   # the nearest frame
            k = np.clip(np.rint(t[:, 0].numpy() * (len(self.frames_A) - 1)), 0, len(self.frames_A) - 1)
            return torch.as_tensor(self.frames_A[k.astype(np.int64)], dtype=torch.float64)
        out = torch.as_tensor(self.centers_A, dtype=torch.float64).expand(len(t), -1, -1).clone()
        for m in self.motions:
            R = _rotation(m.axis, t[:, m.coord] * math.radians(m.degrees))
            p = torch.as_tensor(m.pivot_A, dtype=torch.float64)
            sel = torch.as_tensor(m.atoms)
            out[:, sel] = torch.einsum("bij,bnj->bni", R, out[:, sel] - p) + p
            if m.lift_A is not None:
                out[:, sel] += torch.as_tensor(m.lift_A, dtype=torch.float64)
        return out

    def moving(self) -> np.ndarray:
        """Bool ``(N,)``: the atoms whose position depends on the coordinates (all of them in
        the ``all`` frame, where the core turns as the domains move)."""
        if self.frame == "all" or self.frames_A is not None:
            return np.ones(len(self.centers_A), dtype=bool)
        return np.any([m.atoms for m in self.motions], axis=0)

    def gmm(self, coords, info: dict | None = None, box: int = 64, apix: float = 1.5) -> GMM:
        c = self.centers(np.asarray(coords, np.float64)[None])[0].numpy()
        return GMM(c, self.electrons.copy(), np.full(len(c), ATOM_SIGMA_A, np.float32), box, apix, dict(info or {}))


def _hinge(atoms: dict, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(pivot, unit axis): the line through the C-alpha atoms of residues ``lo`` and ``hi``."""
    ends = []
    for r in (lo, hi):
        sel = (atoms["resseq"] == r) & (atoms["name"] == "CA")
        if not sel.any():
            raise InputError(f"--pdb: no C-alpha atom of residue {r}; the atomic systems need adenylate kinase "
                             "numbering (PDB 1AKE: LID 122-159, NMP 30-59)")
        ends.append(atoms["xyz_A"][np.flatnonzero(sel)[0]])
    axis = ends[1] - ends[0]
    return 0.5 * (ends[0] + ends[1]), axis / np.linalg.norm(axis)


def build_system(system: str, pdb_path: str, frame: str = "core") -> AtomicSystem:
    """The atomic model of ``system`` (one of :data:`SYSTEMS`) from ``pdb_path`` (see module doc),
    poses in ``frame`` (:data:`FRAMES`)."""
    if system not in SYSTEMS:
        raise InputError(f"system {system!r}: unknown; use one of {', '.join(SYSTEMS)}")
    if frame not in FRAMES:
        raise InputError(f"frame {frame!r}: unknown; use one of {', '.join(FRAMES)}")
    if system == "trajectory":
        return _trajectory_system(pdb_path)
    atoms = read_pdb(pdb_path)
    xyz, res = atoms["xyz_A"], atoms["resseq"]
    domain = np.full(len(xyz), "CORE", dtype=object)
    for name, (lo, hi) in DOMAIN_RESIDUES.items():
        domain[(res >= lo) & (res <= hi)] = name
    core_c = xyz[domain == "CORE"].mean(0)
    motions = []
    names = ("LID",) if system == "cyclic" else ("LID", "NMP")
    for name in names:
        sel = (domain == name)
        pivot, axis = _hinge(atoms, *DOMAIN_RESIDUES[name])
        coord = 1 if (system == "two_motions" and name == "NMP") else 0
        degrees = OPENING_DEG[name]
        lift = None
        if system == "cyclic":
            axis = xyz[sel].mean(0) - core_c
            axis /= np.linalg.norm(axis)
            degrees, lift = 360.0, CYCLIC_LIFT_A * axis
        m = DomainMotion(name, sel, pivot, axis, degrees, coord, lift)
        if system != "cyclic":  # opening: the domain's centroid moves away from the core's
            probe = AtomicSystem(system, xyz, atoms["electrons"], domain, [m], ("c", "c2"))
            moved = probe.centers(np.array([[0.3, 0.3]]))[0].numpy()[sel].mean(0)
            if np.linalg.norm(moved - core_c) < np.linalg.norm(xyz[sel].mean(0) - core_c):
                m.axis = -axis
        motions.append(m)
    coords = {"hinge": ("conformation",), "two_motions": ("motion_lid", "motion_nmp"), "cyclic": ("turn",)}[system]
    sysm = AtomicSystem(system, xyz, atoms["electrons"], domain, motions, coords, cyclic=system == "cyclic",
                        residue=np.asarray(res))
    # centre on the electron-weighted centroid of the middle state
    mid = sysm.centers(np.full((1, len(coords)), 0.5))[0].numpy().astype(np.float64)
    shift = (mid * sysm.electrons[:, None]).sum(0) / sysm.electrons.sum()
    sysm.centers_A = xyz - shift
    for m in motions:
        m.pivot_A = m.pivot_A - shift
    sysm.frame = frame
    return sysm


def _trajectory_system(pdb_path: str) -> AtomicSystem:
    """The ``trajectory`` system: every MODEL of ``pdb_path`` superposed on the middle one by all
    atoms (electron-weighted Kabsch) and centred on its electron-weighted centroid."""
    atoms = read_pdb(pdb_path, all_models=True)
    frames, w = atoms["frames_A"], atoms["electrons"].astype(np.float64)
    if len(frames) < 2:
        raise InputError(f"--pdb {pdb_path}: one model; --kind trajectory needs the frames of a trajectory as the "
                         "MODELs of one PDB file (e.g. MDAnalysis, mdtraj or gmx trjconv -o frames.pdb)")
    from ..analysis.refine import remove_rigid_motion  # the weighted Kabsch fit refinement uses
    mid = frames[(len(frames) - 1) // 2]
    mid = mid - (mid * w[:, None]).sum(0) / w.sum()
    fitted = remove_rigid_motion(torch.as_tensor(frames), torch.as_tensor(mid), torch.as_tensor(w), iterations=1)
    return AtomicSystem("trajectory", mid, atoms["electrons"], np.full(len(mid), "CORE", dtype=object), [],
                        ("conformation",), residue=np.asarray(atoms["resseq"]), frame="all",
                        frames_A=fitted.numpy())


class AtomicParticleModels:
    """The ground-truth model of each particle of an atomic set as a :class:`refine.ParticleModels`:
    its atoms at its truth coordinates ``coords[row]`` (``(n, n_coords)``), plus its thermal
    displacement (``thermal_A``, ``seed`` and the particle numbers ``particles[row]`` of the
    simulation). The reference for trained models in the refinement benchmarks."""

    def __init__(self, system: AtomicSystem, coords: np.ndarray, particles: np.ndarray,
                 thermal_A: float = 0.0, seed: int = 0, sigma_A: float = ATOM_SIGMA_A):
        self.system, self.coords = system, np.asarray(coords, np.float64).reshape(len(coords), -1)
        self.particles, self.thermal_A, self.seed = np.asarray(particles), float(thermal_A), int(seed)
        self.neutral_centers_A = system.centers(np.full((1, len(system.coords)), 0.5))[0].numpy()
        self.sigma_A = float(sigma_A)   # atom width; the consensus map's widened width models the average
        self.median_sigma_A = self.sigma_A

    def gaussians(self, rows, device):
        rows = np.asarray(rows)
        cen = self.system.centers(self.coords[rows])
        if self.thermal_A > 0:
            cen = cen + torch.as_tensor(thermal_displacements(self.system, self.particles[rows], self.thermal_A,
                                                              self.seed, cen.numpy()))
        B, n = cen.shape[:2]
        amp = torch.as_tensor(self.system.electrons, dtype=torch.float32).expand(B, n)
        peak = (ATOM_SIGMA_A / self.sigma_A) ** 3  # amplitudes are peak densities: keep each atom's mass
        return (cen.to(device), (peak * amp).contiguous().to(device),
                torch.full((B, n), self.sigma_A, device=device))


def widened_sigma_A(thermal_A: float) -> float:
    """Width (Angstrom) of an atom averaged over thermal fluctuations of RMS ``thermal_A``
    (``sqrt(ATOM_SIGMA_A^2 + thermal_A^2 / 3)``, the per-axis variance added): how the population
    mean (the consensus map) renders each atom."""
    return math.sqrt(ATOM_SIGMA_A ** 2 + float(thermal_A) ** 2 / 3.0)


def draw_coords(system: AtomicSystem, n: int, rng: np.random.Generator) -> np.ndarray:
    """Truth coordinates ``(n, n_coords)`` uniform in [0, 1) (independent per coordinate); a
    trajectory's: frames drawn uniformly, ``frame / (frames - 1)``."""
    if system.frames_A is not None:
        F = len(system.frames_A)
        return rng.integers(0, F, size=(n, 1)) / float(F - 1)
    return rng.uniform(0.0, 1.0, size=(n, len(system.coords)))


def thermal_displacements(system: AtomicSystem, particles: np.ndarray, thermal_A: float, seed: int,
                          centers_A: np.ndarray | None = None) -> np.ndarray:
    """Thermal displacement ``(B, N, 3)`` float32 (Angstrom) of every atom of the particles numbered
    ``particles`` (module doc: RMS ``thermal_A`` per atom, residue-shared and chain-smoothed part plus
    an independent part; drawn from ``(seed, particle)``, so the same particle gets the same field),
    with its rigid-body part about the atoms ``centers_A`` (``(B, N, 3)``, default the structure at
    all coordinates 0) removed: the electron-weighted Kabsch fit of the fluctuated atoms onto them
    (:func:`refine.remove_rigid_motion`, one plain iteration), as MD frames are superposed."""
    n_atoms = len(system.centers_A)
    out = np.zeros((len(particles), n_atoms, 3), np.float32)
    if not thermal_A > 0:
        return out
    res = system.residue if system.residue is not None else np.arange(n_atoms)
    uniq, inv = np.unique(res, return_inverse=True)
    # smoothing along the chain, normalised so the shared part keeps unit variance per residue
    d = uniq[:, None].astype(np.float64) - uniq[None, :]
    K = np.exp(-0.5 * (d / THERMAL_CHAIN_RESIDUES) ** 2)
    K /= np.sqrt((K ** 2).sum(1, keepdims=True))
    s_shared = thermal_A * math.sqrt(THERMAL_SHARED / 3.0)
    s_atom = thermal_A * math.sqrt((1.0 - THERMAL_SHARED) / 3.0)
    for i, p in enumerate(np.asarray(particles, np.int64)):
        rng = np.random.default_rng([int(seed), int(p), 7919])
        shared = K @ rng.standard_normal((len(uniq), 3))
        out[i] = s_shared * shared[inv] + s_atom * rng.standard_normal((n_atoms, 3))
    from ..analysis.refine import remove_rigid_motion  # the weighted Kabsch fit refinement uses
    at = torch.as_tensor(np.array(np.broadcast_to(system.centers_A if centers_A is None else centers_A,
                                                  out.shape)), dtype=torch.float64)
    fitted = torch.stack([remove_rigid_motion((c + torch.as_tensor(d, dtype=torch.float64))[None], c,
                                              torch.as_tensor(system.electrons, dtype=torch.float64),
                                              iterations=1)[0] - c for c, d in zip(at, out)])
    return fitted.numpy().astype(np.float32)


def project_atoms(system: AtomicSystem, truth: pd.DataFrame, coords: np.ndarray, box: int, apix: float,
                  ctf: bool = True, thermal_A: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Noiseless images ``(B, D, D)`` of the particles ``truth`` (rows of :func:`simulate.draw_particles`)
    at truth coordinates ``coords`` ``(B, n_coords)``, with thermal fluctuations of RMS ``thermal_A``
    (:func:`thermal_displacements`, keyed by ``truth['particle']``)."""
    col = {k: np.array(truth[k].to_numpy(), dtype=np.float64) for k in (
        "rot", "tilt", "psi", "origin_x_A", "origin_y_A", "defocus_u_A", "defocus_v_A", "defocus_angle_deg")}
    A = torch.as_tensor(euler_to_matrix(col["rot"], col["tilt"], col["psi"]), dtype=torch.float32)
    origins = torch.as_tensor(np.stack([col["origin_x_A"], col["origin_y_A"]], 1), dtype=torch.float32)
    centers = system.centers(coords)
    if thermal_A > 0:
        centers = centers + torch.as_tensor(thermal_displacements(
            system, truth["particle"].to_numpy(), thermal_A, seed, centers.numpy()))
    n = centers.shape[1]
    F = project(centers, torch.as_tensor(system.electrons), torch.full((n,), ATOM_SIGMA_A), A, box, apix,
                origins_A=origins)
    if ctf:
        ky, kx = fourier_grid(box, apix)
        F = F * ctf_2d(ky, kx, torch.as_tensor(col["defocus_u_A"]), torch.as_tensor(col["defocus_v_A"]),
                       torch.as_tensor(col["defocus_angle_deg"]), VOLTAGE_KV, CS_MM, AMPLITUDE_CONTRAST)
    return fourier_to_image(F, box).float()


def _render(system: AtomicSystem, centers: np.ndarray, weights: np.ndarray, box: int, apix: float,
            sigma_A: float = ATOM_SIGMA_A) -> np.ndarray:
    n = len(centers)
    return render_map(torch.as_tensor(centers, dtype=torch.float32), torch.as_tensor(weights, dtype=torch.float32),
                      torch.full((n,), float(sigma_A)), box, apix).numpy()


def consensus_map(system: AtomicSystem, coords: np.ndarray, box: int, apix: float,
                  thermal_A: float = 0.0) -> np.ndarray:
    """Population mean map: static atoms once, the moving atoms averaged over a histogram of the
    particles' coordinates (:data:`CONSENSUS_BINS` bins per coordinate), in one rendering; thermal
    fluctuations of RMS ``thermal_A`` widen every atom (sigma^2 + thermal_A^2 / 3)."""
    sigma = widened_sigma_A(thermal_A)
    k = len(system.coords)
    if system.frames_A is not None:   # every frame drawn, by its count
        grid, counts = np.unique(np.asarray(coords, np.float64).reshape(-1, k), axis=0, return_counts=True)
    else:
        counts, edges = np.histogramdd(coords, bins=CONSENSUS_BINS.get(k, 6), range=[(0.0, 1.0)] * k)
        mids = [0.5 * (e[:-1] + e[1:]) for e in edges]
        grid = np.stack(np.meshgrid(*mids, indexing="ij"), -1).reshape(-1, k)
    w = counts.reshape(-1) / counts.sum()
    used = w > 0
    mov = system.moving()
    c = system.centers(grid[used]).numpy()[:, mov]  # (S, n_moving, 3)
    peak = (ATOM_SIGMA_A / sigma) ** 3   # amplitudes are peak densities: keep each atom's mass
    static = (_render(system, system.centers_A[~mov], peak * system.electrons[~mov], box, apix, sigma)
              if (~mov).any() else np.zeros((box, box, box), np.float32))
    weights = (peak * w[used][:, None] * system.electrons[mov][None]).reshape(-1)
    return static + _render(system, c.reshape(-1, 3), weights, box, apix, sigma)


def _states(system: AtomicSystem) -> list:
    """``[(name, coords)]`` of the ground-truth maps."""
    m = STATE_MAPS[system.name]
    if system.cyclic:
        return [(f"angle_{int(round(360 * t)):03d}", (t,)) for t in np.arange(m) / m]
    vals = np.linspace(0.0, 1.0, m)
    if len(system.coords) == 1:
        return [(f"conf_{i:03d}", (float(v),)) for i, v in enumerate(vals)]
    return [(f"lid_{i}_nmp_{j}", (float(a), float(b))) for i, a in enumerate(vals) for j, b in enumerate(vals)]


def _check(system, n, box, apix, snr, thermal_A=0.0) -> None:
    if not (thermal_A >= 0 and math.isfinite(thermal_A)):
        raise InputError(f"thermal {thermal_A}: RMS thermal displacement must be >= 0 Angstrom; pass e.g. --thermal 1")
    if system not in SYSTEMS:
        raise InputError(f"system {system!r}: unknown; use one of {', '.join(SYSTEMS)}")
    if int(n) < 1:
        raise InputError(f"n {n}: need at least 1 particle; pass --n 1 or more")
    if int(box) < 16 or int(box) % 2:
        raise InputError(f"box {box}: must be an even number of pixels >= 16; pass e.g. --box 64")
    if not apix > 0:
        raise InputError(f"apix {apix}: pixel size must be positive (Angstrom); pass e.g. --apix 1.5")
    if not snr > 0:
        raise InputError(f"snr {snr}: must be positive (inf for noiseless images); pass e.g. --snr 0.1")


def simulate_atomic(out_dir: str, system: str, pdb_path: str, n: int = 6000, box: int = 64, apix: float = 1.5,
                    snr: float = 0.1, seed: int = 0, max_shift_px: float = 2.0, ctf: bool = True,
                    batch_size: int = 64, thermal_A: float = 0.0, frame: str = "core") -> dict:
    """Simulate ``n`` particles of ``system`` built from ``pdb_path`` into ``out_dir`` (module doc);
    ``thermal_A``: RMS thermal fluctuation of every atom, Angstrom (0: rigid domains only);
    ``frame``: the frame of the true poses (:data:`FRAMES`).
    Returns ``{'out_dir', 'star', 'stack', 'consensus', 'truth_csv', 'json', 'truth_maps',
    'truth_gmm', 'summary'}`` with absolute paths."""
    _check(system, n, box, apix, snr, float(thermal_A))
    n, box, apix, snr, thermal_A = int(n), int(box), float(apix), float(snr), float(thermal_A)
    t0 = time.perf_counter()
    sysm = build_system(system, pdb_path, frame)
    frame = sysm.frame
    out_dir = os.path.abspath(out_dir)
    for sub in ("truth_maps", "truth_gmm"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    rng_particles, rng_noise, rng_coords = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3))
    truth = draw_particles(n, "homogeneous", rng_particles, apix, max_shift_px)
    coords = draw_coords(sysm, n, rng_particles)
    # fits in the box: every atom of the extreme states within 0.48 box of the centre
    probe = np.array(np.meshgrid(*[[0.0, 0.25, 0.5, 0.75, 1.0]] * len(sysm.coords), indexing="ij")).reshape(
        len(sysm.coords), -1).T
    if sysm.frames_A is not None:
        probe = np.arange(len(sysm.frames_A))[:, None] / (len(sysm.frames_A) - 1.0)
    r_max = float(sysm.centers(probe).norm(dim=-1).max()) + 2 * ATOM_SIGMA_A + 2 * thermal_A
    if r_max > 0.5 * box * apix - max_shift_px * apix:
        raise InputError(f"box {box} x {apix} A: the {system} system reaches {r_max:.0f} A from the centre; "
                         f"use a box of at least {int(math.ceil(2 * r_max / apix + 2 * max_shift_px + 2))} px")
    truth["conformation"] = coords[:, 0]
    for j, name in enumerate(sysm.coords):
        if name != "conformation":
            truth.insert(3 + j, name, coords[:, j])
    if sysm.cyclic:
        truth.insert(3 + len(sysm.coords), "angle_deg", 360.0 * coords[:, 0])
    if sysm.frames_A is not None:
        truth.insert(3, "frame", np.rint(coords[:, 0] * (len(sysm.frames_A) - 1)).astype(np.int64))
    truth["image_name"] = [f"{i:06d}@particles.mrcs" for i in range(1, n + 1)]

    stack_path = os.path.join(out_dir, "particles.mrcs")
    n_cal, signal_var, noise_sigma = write_stack(
        stack_path, n, box, apix, snr,
        lambda rows: project_atoms(sysm, truth.iloc[rows], coords[rows], box, apix, ctf, thermal_A, seed).numpy(),
        rng_noise, batch_size)
    t_stack = time.perf_counter() - t0
    from ..io.star import write_star
    star_path = os.path.join(out_dir, "particles.star")
    write_star(star_path, _star_tables(truth, box, apix, rng_coords))
    csv_path = os.path.join(out_dir, "truth.csv")
    atomic_write(csv_path, lambda tmp: truth.to_csv(tmp, index=False, na_rep="nan"))

    maps, gmms, states = {}, {}, []
    for name, c in _states(sysm):
        g = sysm.gmm(c, {"system": system, "state": name, "coords": list(c)}, box, apix)
        gmms[name] = os.path.join(out_dir, "truth_gmm", name + ".npz")
        g.save(gmms[name])
        maps[name] = os.path.join(out_dir, "truth_maps", name + ".mrc")
        write_map(maps[name], g.render(), apix)
        states.append({"name": name, "coords": list(c), "map": os.path.relpath(maps[name], out_dir),
                       "gmm": os.path.relpath(gmms[name], out_dir)})
    consensus_path = os.path.join(out_dir, "consensus.mrc")
    write_map(consensus_path, consensus_map(sysm, coords, box, apix, thermal_A), apix)

    motions = []
    for m in sysm.motions:
        lo, hi = DOMAIN_RESIDUES[m.name]
        ends = sysm.centers(np.stack([np.zeros(len(sysm.coords)), np.where(
            np.arange(len(sysm.coords)) == m.coord, 0.5 if sysm.cyclic else 1.0, 0.0)]))[:, m.atoms].numpy()
        motions.append({"domain": m.name, "residues": [lo, hi], "n_atoms": int(m.atoms.sum()),
                        "pivot_A": [float(v) for v in m.pivot_A], "axis": [float(v) for v in m.axis],
                        "degrees": m.degrees, "coordinate": sysm.coords[m.coord],
                        "max_centroid_shift_A": float(np.linalg.norm(ends[1].mean(0) - ends[0].mean(0)))})
    summary = {"system": system, "kind": system, "n": n, "box": box, "apix": apix,
               "snr": snr if math.isfinite(snr) else "inf", "signal_variance": signal_var,
               "noise_sigma": noise_sigma, "calibration_particles": n_cal, "n_atoms": int(len(sysm.centers_A)),
               "molecule_radius_A": r_max, "seconds_stack": round(t_stack, 3),
               "seconds_total": round(time.perf_counter() - t0, 3)}
    params = {"system": system, "kind": system, "pdb": os.path.basename(pdb_path), "n": n, "box": box,
              "apix": apix, "snr": summary["snr"], "seed": int(seed), "max_shift_px": float(max_shift_px),
              "ctf_applied": bool(ctf), "atom_sigma_A": ATOM_SIGMA_A, "voltage_kv": VOLTAGE_KV, "cs_mm": CS_MM,
              "amplitude_contrast": AMPLITUDE_CONTRAST, "truth_coordinates": list(sysm.coords),
              "cyclic": sysm.cyclic, "thermal_A": thermal_A, "frame": frame, "motions": motions, "states": states,
              "n_frames": None if sysm.frames_A is None else int(len(sysm.frames_A)),
              "files": {"star": "particles.star", "stack": "particles.mrcs", "consensus": "consensus.mrc",
                        "truth_csv": "truth.csv"}, "summary": summary}
    json_path = os.path.join(out_dir, "simulation.json")
    write_text(json_path, json.dumps(params, indent=2) + "\n")
    log.info("simulated %d %s particles from %s (box %d, %.3g A/px, SNR %s) in %.1f s -> %s", n, system,
             os.path.basename(pdb_path), box, apix, summary["snr"], summary["seconds_total"], out_dir)
    return {"out_dir": out_dir, "star": star_path, "stack": stack_path, "consensus": consensus_path,
            "truth_csv": csv_path, "json": json_path, "truth_maps": maps, "truth_gmm": gmms, "summary": summary}


def domain_atoms_mask(sim_json: str, pdb_path: str, centers_A: np.ndarray, domain: str,
                      radius_A: float = 4.0) -> np.ndarray:
    """Bool ``(M,)``: which of the Gaussians ``centers_A`` (e.g. a neutral GMM's) lie within
    ``radius_A`` of an atom of ``domain`` (``LID``/``NMP``) and nearer to it than to the rest,
    with the structure as centred in that simulation (middle state)."""
    with open(sim_json) as f:
        params = json.load(f)
    sysm = build_system(params["system"], pdb_path, params.get("frame", "core"))
    atoms = sysm.centers(np.full((1, len(sysm.coords)), 0.5))[0].numpy()
    from scipy.spatial import cKDTree
    d_in, _ = cKDTree(atoms[sysm.domain == domain]).query(centers_A)
    d_out, _ = cKDTree(atoms[sysm.domain != domain]).query(centers_A)
    return (d_in <= radius_A) & (d_in < d_out)
