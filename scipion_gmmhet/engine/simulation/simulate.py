"""Simulated single-particle datasets with known heterogeneity: the demo's and tests' data.

The molecule
    A pseudo-atomic model (isotropic Gaussians of one width) of five domains, each a cloud of
    random points, at protein-like constant density, inside a slightly rotated ellipsoid:
    a core of three globular domains (0, 1, 2), an elongated *arm* (3) attached to domain 1
    by a hinge, and a *subunit* (4, about 10-15 % of the mass) bound on the far side of
    domain 0. It is deliberately asymmetric. Its geometry is defined in units of the box
    length ``L = box * apix``: the molecule spans about 60-70 % of the box whatever ``box``
    and ``apix`` are, and the Gaussian width is ``max(1.2, 0.02 * box)`` pixels. The shape is
    fixed by ``molecule_seed`` (default 0, independent of the particles' ``seed``), so datasets
    made with different seeds show the same molecule. Gaussian centres follow :mod:`gmm`
    (Angstrom, xyz from the centre voxel); amplitudes are set so the map density is about 1
    inside the molecule. Gaussians are stored in domain order (core, arm, subunit), so a
    state's GMM without the subunit is a prefix of one with it.

Heterogeneity (``kind``)
    ``homogeneous``: core + arm at the middle of its path (c = 0.5), no subunit.
    ``conformational``: the arm rotates about a hinge axis by ``(c - 0.5) * hinge_angle_deg``
    (60 degrees end to end) and slides by ``(c - 0.5) * 0.08 L``, with ``c`` uniform in
    [0, 1] per particle; no subunit. ``compositional``: arm fixed at c = 0.5, subunit
    present in a fraction ``subunit_fraction`` of the particles. ``mixed``: both,
    independently.

Particles
    Uniform random rotations on SO(3) (normalised Gaussian quaternions) turned into RELION
    Euler angles with :func:`conventions.matrix_to_euler`; the projection uses the matrix
    rebuilt from those angles, so star angles and images agree exactly. Origin shifts uniform
    in +-``max_shift_px``; CTF 300 kV, Cs 2.7 mm, amplitude contrast 0.1, defocus U uniform
    in 8000-25000 A, V = U - uniform(0, 400) A, astigmatism angle uniform in [0, 180) deg.
    Images are :func:`gmm.project`'s transform of the Gaussians' projection with the origin
    shift, times
    :func:`conventions.ctf_2d`, back to real space with :func:`conventions.fourier_to_image`,
    plus white Gaussian noise of standard deviation ``sqrt(S / snr)``, where ``S`` is the
    variance (over the box) of the noiseless CTF-applied image averaged over the first
    particles (all of them up to 512; fewer above box 90, to hold 16 MB at most), so the SNR
    holds over the whole stack. ``snr = inf`` writes noiseless images; ``ctf=False`` leaves
    out the CTF (for tests; the star still carries the drawn defoci and ``simulation.json``
    says so).

Output files in ``out_dir`` (all written atomically)
    ``particles.star``   RELION 3.1 (optics + particles tables), images ``NNNNNN@particles.mrcs``
    ``particles.mrcs``   float32 image stack (pixel size in the header), written in batches
    ``consensus.mrc``    population-weighted mean map (what a consensus refinement gives):
                         static part + the arm averaged over the particles' c histogram (20
                         bins) + the subunit times the fraction of particles that carry it
    ``truth.csv``        one row per particle in star order; columns ``particle`` (1-based star
                         row), ``conformation`` (c in [0, 1]; ``nan`` for kinds without
                         conformational change, whose arm sits at c = 0.5), ``composition``
                         (1 subunit present, 0 absent; always 0 for homogeneous and
                         conformational), ``rot``, ``tilt``, ``psi`` (deg), ``origin_x_A``,
                         ``origin_y_A``, ``defocus_u_A``, ``defocus_v_A``, ``defocus_angle_deg``,
                         ``image_name`` (as in the star)
    ``truth_maps/*.mrc`` ground-truth maps of the states: ``state`` (homogeneous);
                         ``conf_000`` ... (``n_states_maps`` evenly spaced c from 0 to 1);
                         ``with_subunit``, ``without_subunit``; for mixed
                         ``conf_000_with_subunit`` ... (the product set)
                         ``neutral``: the conformation a neutral model represents (the arm at
                         c = 0.5, the subunit when most particles carry it), to score
                         motion-corrected maps
    ``truth_gmm/*.npz``  the same states as :class:`gmm.GMM` files
    ``simulation.json``  every parameter, the states (name, c, composition, files), the
                         Gaussian index ranges of the domains, noise level and timings
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..conventions import ctf_2d, euler_to_matrix, fourier_grid, fourier_to_image, matrix_to_euler
from ..io.atomic import atomic_write, write_text
from ..errors import InputError
from ..model.gmm import GMM, project, render_map
from ..io.mrc import write_map
from ..io.star import write_star
from .stack import write_stack

log = logging.getLogger(__name__)

KINDS = ("homogeneous", "conformational", "compositional", "mixed")
VOLTAGE_KV = 300.0
CS_MM = 2.7
AMPLITUDE_CONTRAST = 0.1
DEFOCUS_RANGE_A = (8000.0, 25000.0)
MAX_ASTIGMATISM_A = 400.0
HINGE_ANGLE_DEG = 60.0
ARM_SLIDE_L = 0.08           # arm translation end to end, in units of the box length
CONSENSUS_BINS = 20
PARTICLES_PER_MICROGRAPH = 50
MICROGRAPH_SIZE_PX = 4096
DOMAIN_NAMES = ("core0", "core1", "core2", "arm", "subunit")

# Domain layout in units of L = box * apix: centre (x, y, z), semi-axes.
_DOMAINS_L = (
    ((-0.12, -0.06, 0.00), (0.120, 0.095, 0.085)),
    ((0.09, -0.09, 0.05), (0.105, 0.090, 0.090)),
    ((-0.01, 0.10, -0.06), (0.090, 0.080, 0.100)),
)
_HINGE_L = (0.13, 0.00, 0.00)
_ARM_DIRECTION = (0.6, 0.8, 0.0)         # hinge -> arm tip at c = 0.5
_ARM_SEMI_AXES_L = (0.120, 0.062, 0.062)  # along the arm, then across
_HINGE_AXIS = (0.2, -0.1, 1.0)
_ARM_SLIDE_DIRECTION = (0.0, 0.0, 1.0)
_SUBUNIT_L = ((-0.25, -0.13, 0.07), (0.085, 0.075, 0.070))
_MAX_RADIUS_L = 0.38


# ----------------------------------------------------------------------------- the molecule

@dataclass
class Molecule:
    """The pseudo-atomic model. ``centers_A`` ``(N, 3)`` with the arm at c = 0.5; ``domain``
    ``(N,)`` index into :data:`DOMAIN_NAMES`, sorted; one ``sigma_A`` and ``amplitude``."""

    centers_A: np.ndarray
    domain: np.ndarray
    sigma_A: float
    amplitude: float
    hinge_A: np.ndarray
    hinge_axis: np.ndarray
    hinge_angle_deg: float
    slide_A: np.ndarray       # arm translation from c = 0 to c = 1
    box: int
    apix: float

    def ranges(self) -> dict:
        """``{domain name: [first, stop)}`` Gaussian index ranges."""
        out = {}
        for d, name in enumerate(DOMAIN_NAMES):
            idx = np.flatnonzero(self.domain == d)
            out[name] = [int(idx[0]), int(idx[-1]) + 1] if idx.size else [0, 0]
        return out

    def arm_slice(self) -> slice:
        r = self.ranges()["arm"]
        return slice(r[0], r[1])

    def n_without_subunit(self) -> int:
        return int(np.count_nonzero(self.domain != DOMAIN_NAMES.index("subunit")))

    def arm_centers(self, c: torch.Tensor) -> torch.Tensor:
        """Arm Gaussian centres ``(B, n_arm, 3)`` (Angstrom) at conformations ``c`` ``(B,)``."""
        c = (c.to(torch.float64) if isinstance(c, torch.Tensor) else
             torch.tensor(np.asarray(c, dtype=np.float64))).reshape(-1)
        theta = (c - 0.5) * math.radians(self.hinge_angle_deg)
        u = torch.as_tensor(self.hinge_axis, dtype=torch.float64)
        K = torch.tensor([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]], dtype=torch.float64)
        s, co = torch.sin(theta)[:, None, None], torch.cos(theta)[:, None, None]
        R = torch.eye(3, dtype=torch.float64) + s * K + (1.0 - co) * (K @ K)  # Rodrigues, (B, 3, 3)
        h = torch.as_tensor(self.hinge_A, dtype=torch.float64)
        x = torch.as_tensor(self.centers_A[self.arm_slice()], dtype=torch.float64) - h
        t = (c - 0.5)[:, None] * torch.as_tensor(self.slide_A, dtype=torch.float64)
        return (torch.einsum("bij,nj->bni", R, x) + h + t[:, None, :]).float()

    def state_centers(self, c: float, with_subunit: bool) -> np.ndarray:
        """Gaussian centres ``(N_state, 3)`` of one state (subunit Gaussians last, if present)."""
        n = len(self.centers_A) if with_subunit else self.n_without_subunit()
        centers = self.centers_A[:n].copy()
        centers[self.arm_slice()] = self.arm_centers(torch.tensor([c]))[0].numpy()
        return centers

    def conformation_models(self, conformation) -> "ConformationModels":
        """Each particle's ground-truth GMM (no subunit) as a :class:`refine.ParticleModels`."""
        return ConformationModels(self, conformation)

    def state_gmm(self, c: float, with_subunit: bool, info: dict | None = None) -> GMM:
        centers = self.state_centers(c, with_subunit)
        n = len(centers)
        return GMM(centers, np.full(n, self.amplitude), np.full(n, self.sigma_A), self.box, self.apix,
                   dict(info or {}))


def _small_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = math.radians(rng.uniform(-max_deg, max_deg))
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * K + (1 - math.cos(a)) * K @ K


def _inside(points: np.ndarray, centre: np.ndarray, R: np.ndarray, axes: np.ndarray) -> np.ndarray:
    local = (points - centre) @ R  # coordinates along the ellipsoid's axes (columns of R)
    return np.sum((local / axes) ** 2, axis=1) <= 1.0


def build_molecule(box: int, apix: float, molecule_seed: int = 0, n_gaussians: int = 1600) -> Molecule:
    """The five-domain pseudo-atomic molecule for a ``box`` x ``apix`` map (see module doc).

    ``n_gaussians`` is the number of points drawn before overlapping regions are thinned, so
    the model holds a little fewer."""
    rng = np.random.default_rng(np.random.SeedSequence([int(molecule_seed), 0x6D6F6C]))
    L = box * apix
    arm_dir = np.asarray(_ARM_DIRECTION, float)
    arm_dir /= np.linalg.norm(arm_dir)
    hinge = np.asarray(_HINGE_L) * L
    # Ellipsoids: (centre, rotation whose columns are the axes, semi-axes), all in Angstrom.
    ells = []
    for centre, axes in _DOMAINS_L:
        jitter = rng.uniform(-0.01, 0.01, size=3)
        ells.append(((np.asarray(centre) + jitter) * L, _small_rotation(rng, 25.0), np.asarray(axes) * L))
    a_axes = np.asarray(_ARM_SEMI_AXES_L) * L
    e1 = arm_dir
    e2 = np.cross(e1, [0.0, 0.0, 1.0])
    e2 /= np.linalg.norm(e2)
    R_arm = np.stack([e1, e2, np.cross(e1, e2)], axis=1) @ _small_rotation(rng, 10.0)
    # keep the arm's first axis on the hinge -> tip line so its near end touches the hinge
    R_arm[:, 0] = e1
    R_arm[:, 1] -= R_arm[:, 0] * (R_arm[:, 0] @ R_arm[:, 1])
    R_arm[:, 1] /= np.linalg.norm(R_arm[:, 1])
    R_arm[:, 2] = np.cross(R_arm[:, 0], R_arm[:, 1])
    ells.append((hinge + e1 * a_axes[0], R_arm, a_axes))
    s_centre, s_axes = _SUBUNIT_L
    ells.append(((np.asarray(s_centre) + rng.uniform(-0.01, 0.01, 3)) * L, _small_rotation(rng, 25.0),
                 np.asarray(s_axes) * L))

    volumes = np.array([np.prod(ax) for _, _, ax in ells])
    counts = np.maximum(8, np.round(n_gaussians * volumes / volumes.sum()).astype(int))
    points, domains = [], []
    for d, ((centre, R, axes), m) in enumerate(zip(ells, counts)):
        direction = rng.normal(size=(m, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        p = centre + (direction * rng.uniform(0, 1, (m, 1)) ** (1 / 3) * axes) @ R.T
        keep = np.ones(m, bool)
        for prev in range(d):  # constant density: later domains give way where they overlap
            keep &= ~_inside(p, *ells[prev])
        points.append(p[keep])
        domains.append(np.full(int(keep.sum()), d))
    centers = np.concatenate(points)
    domain = np.concatenate(domains)
    volume_per_point = volumes.sum() / counts.sum()

    sigma_A = max(1.2, 0.02 * box) * apix
    slide = np.asarray(_ARM_SLIDE_DIRECTION, float) * ARM_SLIDE_L * L
    axis = np.asarray(_HINGE_AXIS, float) / np.linalg.norm(_HINGE_AXIS)
    mol = Molecule(centers, domain, sigma_A, 1.0, hinge, axis, HINGE_ANGLE_DEG, slide, int(box), float(apix))
    # centre the subunit-free molecule (arm at c = 0.5) on the box centre
    com = centers[domain != DOMAIN_NAMES.index("subunit")].mean(axis=0)
    mol.centers_A = (centers - com).astype(np.float64)
    mol.hinge_A = hinge - com
    # shrink if any pose would reach too close to the box edge
    extremes = np.concatenate([mol.state_centers(c, True) for c in np.linspace(0.0, 1.0, 11)])
    r_max = float(np.linalg.norm(extremes, axis=1).max())
    scale = min(1.0, _MAX_RADIUS_L * L / r_max)
    mol.centers_A *= scale
    mol.hinge_A = mol.hinge_A * scale
    mol.slide_A = mol.slide_A * scale
    volume_per_point *= scale ** 3
    # peak amplitude giving a mean density of ~1 inside the molecule
    mol.amplitude = float(volume_per_point / ((2 * math.pi) ** 1.5 * sigma_A ** 3))
    mol.centers_A = mol.centers_A.astype(np.float32)
    return mol


# ----------------------------------------------------------------------------- per-particle draws

class ConformationModels:
    """The ground-truth GMM of each particle of a conformational set: the molecule without its
    subunit, the arm at the particle's conformation ``conformation[row]``. Gives refinement
    (:class:`refine.ParticleModels`) the exact models, the reference for trained ones."""

    def __init__(self, mol: Molecule, conformation):
        self.mol = mol
        self.c = np.asarray(conformation, dtype=np.float64)
        self.n = mol.n_without_subunit()
        self.neutral_centers_A = mol.centers_A[:self.n]
        self.median_sigma_A = float(mol.sigma_A)

    def gaussians(self, rows, device):
        B = len(rows)
        cen = torch.as_tensor(self.mol.centers_A[:self.n], dtype=torch.float32).expand(B, self.n, 3).clone()
        cen[:, self.mol.arm_slice()] = self.mol.arm_centers(torch.as_tensor(self.c[np.asarray(rows)]))
        return (cen.to(device), torch.full((B, self.n), float(self.mol.amplitude), device=device),
                torch.full((B, self.n), float(self.mol.sigma_A), device=device))


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices ``(n, 3, 3)`` uniform on SO(3) (normalised Gaussian quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=-2)


def draw_particles(n: int, kind: str, rng: np.random.Generator, apix: float, max_shift_px: float = 2.0,
                   subunit_fraction: float = 0.5) -> pd.DataFrame:
    """Ground truth of ``n`` particles: the ``truth.csv`` columns (without ``image_name``)."""
    rot, tilt, psi = matrix_to_euler(random_rotations(n, rng))
    origin = rng.uniform(-max_shift_px, max_shift_px, size=(n, 2)) * apix
    du = rng.uniform(*DEFOCUS_RANGE_A, size=n)
    dv = du - rng.uniform(0.0, MAX_ASTIGMATISM_A, size=n)
    dang = rng.uniform(0.0, 180.0, size=n)
    conformational = kind in ("conformational", "mixed")
    compositional = kind in ("compositional", "mixed")
    c = rng.uniform(0.0, 1.0, size=n) if conformational else np.full(n, np.nan)
    comp = (rng.uniform(size=n) < subunit_fraction).astype(np.int64) if compositional else np.zeros(n, np.int64)
    return pd.DataFrame({
        "particle": np.arange(1, n + 1), "conformation": c, "composition": comp,
        "rot": rot, "tilt": tilt, "psi": psi, "origin_x_A": origin[:, 0], "origin_y_A": origin[:, 1],
        "defocus_u_A": du, "defocus_v_A": dv, "defocus_angle_deg": dang,
    })


def project_particles(mol: Molecule, truth: pd.DataFrame, kind: str, ctf: bool = True, device="cpu") -> torch.Tensor:
    """Noiseless images ``(B, D, D)`` float32 (on ``device``) of the particles in ``truth`` (rows
    of :func:`draw_particles`): :func:`gmm.project` of each particle's state at its pose, origin
    shift and (if ``ctf``) CTF."""
    box, apix = mol.box, mol.apix
    B = len(truth)
    col = {k: np.array(truth[k].to_numpy(), dtype=np.float64) for k in (
        "rot", "tilt", "psi", "origin_x_A", "origin_y_A", "defocus_u_A", "defocus_v_A", "defocus_angle_deg",
        "conformation", "composition")}
    A = torch.as_tensor(euler_to_matrix(col["rot"], col["tilt"], col["psi"]), dtype=torch.float32)
    origins = torch.as_tensor(np.stack([col["origin_x_A"], col["origin_y_A"]], 1), dtype=torch.float32)
    compositional = kind in ("compositional", "mixed")
    n = len(mol.centers_A) if compositional else mol.n_without_subunit()
    centers = torch.as_tensor(mol.centers_A[:n])
    if kind in ("conformational", "mixed"):
        centers = centers.expand(B, n, 3).clone()
        centers[:, mol.arm_slice()] = mol.arm_centers(torch.as_tensor(col["conformation"]))
    amplitudes = torch.full((n,), mol.amplitude, dtype=torch.float32)
    if compositional:
        amplitudes = amplitudes.expand(B, n).clone()
        sub = torch.as_tensor(mol.domain[:n] == DOMAIN_NAMES.index("subunit"))
        amplitudes[:, sub] *= torch.as_tensor(col["composition"], dtype=torch.float32)[:, None]
    sigmas = torch.full((n,), mol.sigma_A, dtype=torch.float32)
    dev = torch.device(device)
    F = project(centers.to(dev), amplitudes.to(dev), sigmas.to(dev), A.to(dev), box, apix, origins_A=origins.to(dev))
    if ctf:
        ky, kx = fourier_grid(box, apix, device=dev)
        F = F * ctf_2d(ky, kx, *(torch.as_tensor(col[k], device=dev) for k in ("defocus_u_A", "defocus_v_A",
                       "defocus_angle_deg")), VOLTAGE_KV, CS_MM, AMPLITUDE_CONTRAST)
    return fourier_to_image(F, box).float()


# ----------------------------------------------------------------------------- writers

def _star_tables(truth: pd.DataFrame, box: int, apix: float, rng: np.random.Generator) -> dict:
    n = len(truth)
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [VOLTAGE_KV],
        "rlnSphericalAberration": [CS_MM], "rlnAmplitudeContrast": [AMPLITUDE_CONTRAST],
        "rlnImagePixelSize": [float(apix)], "rlnImageSize": [int(box)], "rlnImageDimensionality": [2],
        "rlnCtfDataAreCtfPremultiplied": [0],
    })
    mic = (np.arange(n) // PARTICLES_PER_MICROGRAPH) + 1
    coords = rng.uniform(box, MICROGRAPH_SIZE_PX - box, size=(n, 2)).round(1)
    particles = pd.DataFrame({
        "rlnImageName": truth["image_name"].to_numpy(),
        "rlnMicrographName": [f"micrographs/mic_{m:05d}.mrc" for m in mic],
        "rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1],
        "rlnAngleRot": truth["rot"].to_numpy(), "rlnAngleTilt": truth["tilt"].to_numpy(),
        "rlnAnglePsi": truth["psi"].to_numpy(),
        "rlnOriginXAngst": truth["origin_x_A"].to_numpy(), "rlnOriginYAngst": truth["origin_y_A"].to_numpy(),
        "rlnDefocusU": truth["defocus_u_A"].to_numpy(), "rlnDefocusV": truth["defocus_v_A"].to_numpy(),
        "rlnDefocusAngle": truth["defocus_angle_deg"].to_numpy(), "rlnPhaseShift": np.zeros(n),
        "rlnCtfBfactor": np.zeros(n), "rlnOpticsGroup": np.ones(n, np.int64),
        "rlnRandomSubset": (np.arange(n) % 2 + 1).astype(np.int64),
    })
    return {"optics": optics, "particles": particles}


# ----------------------------------------------------------------------------- states and maps

def _states(kind: str, n_states_maps: int) -> list:
    """``[(name, c, with_subunit)]`` of the ground-truth states."""
    cs = list(np.linspace(0.0, 1.0, n_states_maps)) if n_states_maps > 1 else [0.5]
    if kind == "homogeneous":
        return [("state", 0.5, False)]
    if kind == "conformational":
        return [(f"conf_{i:03d}", float(c), False) for i, c in enumerate(cs)]
    if kind == "compositional":
        return [("with_subunit", 0.5, True), ("without_subunit", 0.5, False)]
    return [(f"conf_{i:03d}_{s}", float(c), w) for i, c in enumerate(cs)
            for s, w in (("with_subunit", True), ("without_subunit", False))]


class StateRenderer:
    """Maps of states as sums of separately rendered parts (rendering is linear): the static
    core and the subunit once each, the arm once per conformation."""

    def __init__(self, mol: Molecule):
        self.mol = mol
        sub = DOMAIN_NAMES.index("subunit")
        self._core = self._render(mol.centers_A[mol.domain < DOMAIN_NAMES.index("arm")])
        self._sub = self._render(mol.centers_A[mol.domain == sub]) if np.any(mol.domain == sub) else 0.0

    def _render(self, centers_A: np.ndarray, weights: np.ndarray | float = 1.0) -> np.ndarray:
        mol, n = self.mol, len(centers_A)
        amplitudes = torch.tensor(np.broadcast_to(mol.amplitude * np.asarray(weights, np.float32), (n,)),
                                  dtype=torch.float32)
        return render_map(torch.as_tensor(centers_A, dtype=torch.float32), amplitudes,
                          torch.full((n,), mol.sigma_A), mol.box, mol.apix).numpy()

    def arm(self, c: float) -> np.ndarray:
        return self._render(self.mol.arm_centers(torch.tensor([float(c)]))[0].numpy())

    def state(self, c: float, with_subunit: bool) -> np.ndarray:
        """The map of :meth:`Molecule.state_gmm` ``(c, with_subunit)``."""
        return self._core + self.arm(c) + (self._sub if with_subunit else 0.0)

    def consensus(self, truth: pd.DataFrame, kind: str) -> np.ndarray:
        """Population-weighted mean of the particles' states: the arm averaged over a
        :data:`CONSENSUS_BINS`-bin histogram of the particles' c, the subunit weighted by the
        fraction of particles carrying it."""
        vol = self._core.copy()
        if kind in ("conformational", "mixed"):
            counts, edges = np.histogram(truth["conformation"].to_numpy(), bins=CONSENSUS_BINS, range=(0.0, 1.0))
            used = np.flatnonzero(counts)
            arms = self.mol.arm_centers(0.5 * (edges[used] + edges[used + 1])).numpy()  # (K, n_arm, 3)
            weights = np.repeat(counts[used] / counts.sum(), arms.shape[1])
            vol += self._render(arms.reshape(-1, 3), weights)  # all bins in one rendering
        else:
            vol += self.arm(0.5)
        if kind in ("compositional", "mixed"):
            vol += float(truth["composition"].mean()) * self._sub
        return vol


# ----------------------------------------------------------------------------- the driver

def _check(kind, n, box, apix, snr, n_states_maps, subunit_fraction, max_shift_px) -> None:
    if kind not in KINDS:
        raise InputError(f"kind {kind!r}: unknown; use one of {', '.join(KINDS)}")
    if int(n) < 1:
        raise InputError(f"n {n}: need at least 1 particle; pass --n 1 or more")
    if int(box) < 16 or int(box) % 2:
        raise InputError(f"box {box}: must be an even number of pixels >= 16; pass e.g. --box 64")
    if not apix > 0:
        raise InputError(f"apix {apix}: pixel size must be positive (Angstrom); pass e.g. --apix 3.0")
    if not snr > 0:
        raise InputError(f"snr {snr}: must be positive (inf for noiseless images); pass e.g. --snr 0.1")
    if int(n_states_maps) < 1:
        raise InputError(f"n_states_maps {n_states_maps}: need at least 1 ground-truth map; pass e.g. 5")
    if not 0.0 <= subunit_fraction <= 1.0:
        raise InputError(f"subunit_fraction {subunit_fraction}: must be in [0, 1]; pass e.g. 0.5")
    if not 0.0 <= max_shift_px <= 0.1 * box:
        raise InputError(f"max_shift_px {max_shift_px}: must be in [0, box/10]; pass e.g. 2")


def _write_states(mol, renderer, kind: str, n_states_maps: int, out_dir: str, apix: float):
    """Ground-truth GMM (``truth_gmm/NAME.npz``) and map (``truth_maps/NAME.mrc``) of each state.
    Returns ({state: map path}, {state: GMM path}, [state records for simulation.json])."""
    maps, gmms, states = {}, {}, []
    for name, c, with_sub in _states(kind, n_states_maps):
        g = mol.state_gmm(c, with_sub, {"kind": kind, "state": name, "conformation": c,
                                        "composition": int(with_sub)})
        gmms[name] = os.path.join(out_dir, "truth_gmm", name + ".npz")
        g.save(gmms[name])
        maps[name] = os.path.join(out_dir, "truth_maps", name + ".mrc")
        write_map(maps[name], renderer.state(c, with_sub), apix)
        states.append({"name": name, "conformation": c, "composition": int(with_sub),
                       "map": os.path.relpath(maps[name], out_dir), "gmm": os.path.relpath(gmms[name], out_dir),
                       "n_gaussians": len(g)})
    return maps, gmms, states


def _write_neutral(mol, renderer, truth, kind: str, out_dir: str, apix: float) -> tuple[str, str]:
    """The truth map and GMM of the conformation a neutral model represents (the arm mid-path,
    the subunit as most particles have it): ``truth_maps/neutral.mrc``, ``truth_gmm/neutral.npz``."""
    neutral_sub = bool(truth["composition"].mean() > 0.5)
    map_path = os.path.join(out_dir, "truth_maps", "neutral.mrc")
    write_map(map_path, renderer.state(0.5, neutral_sub), apix)
    gmm_path = os.path.join(out_dir, "truth_gmm", "neutral.npz")
    mol.state_gmm(0.5, neutral_sub, {"kind": kind, "state": "neutral"}).save(gmm_path)
    return map_path, gmm_path


def simulate(out_dir: str, kind: str, n: int = 5000, box: int = 64, apix: float = 3.0, snr: float = 0.1,
             seed: int = 0, n_states_maps: int = 5, subunit_fraction: float = 0.5, molecule_seed: int = 0,
             max_shift_px: float = 2.0, ctf: bool = True, n_gaussians: int = 1600,
             batch_size: int | None = None, device="cpu") -> dict:
    """Simulate a dataset into ``out_dir`` (see the module docstring for the files).

    ``kind`` one of :data:`KINDS`; ``n`` particles of ``box`` pixels of ``apix`` Angstrom;
    white noise at ``snr`` (``math.inf``: none); ``seed`` fixes the particles, noise and
    micrograph coordinates, ``molecule_seed`` the molecule. Returns ``{'out_dir', 'star',
    'stack', 'consensus', 'truth_csv', 'json', 'truth_maps': {state: path}, 'truth_gmm':
    {state: path}, 'summary': {...}}`` with absolute paths. ``device``: where the images are
    projected (e.g. ``cuda``; the noise is drawn on the host, so the stack is the same up to rounding).
    """
    _check(kind, n, box, apix, snr, n_states_maps, subunit_fraction, max_shift_px)
    n, box, apix, snr = int(n), int(box), float(apix), float(snr)
    t0 = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.join(out_dir, "truth_maps"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "truth_gmm"), exist_ok=True)
    streams = np.random.SeedSequence(int(seed)).spawn(3)
    rng_particles, rng_noise, rng_coords = (np.random.default_rng(s) for s in streams)

    mol = build_molecule(box, apix, molecule_seed, n_gaussians)
    truth = draw_particles(n, kind, rng_particles, apix, max_shift_px, subunit_fraction)
    truth["image_name"] = [f"{i:06d}@particles.mrcs" for i in range(1, n + 1)]

    # stack, in batches; noise level from the first `n_cal` noiseless images
    n_atoms = len(mol.centers_A) if kind in ("compositional", "mixed") else mol.n_without_subunit()
    if batch_size is None:
        batch_size = int(max(8, min(256, 8_000_000 // (n_atoms * box)))) * (8 if str(device).startswith("cuda") else 1)
    stack_path = os.path.join(out_dir, "particles.mrcs")
    n_cal, signal_var, noise_sigma = write_stack(
        stack_path, n, box, apix, snr,
        lambda rows: project_particles(mol, truth.iloc[rows], kind, ctf, device).cpu().numpy(), rng_noise, batch_size)
    t_stack = time.perf_counter() - t0

    star_path = os.path.join(out_dir, "particles.star")
    write_star(star_path, _star_tables(truth, box, apix, rng_coords))
    csv_path = os.path.join(out_dir, "truth.csv")
    atomic_write(csv_path, lambda tmp: truth.to_csv(tmp, index=False, na_rep="nan"))

    renderer = StateRenderer(mol)
    maps, gmms, states = _write_states(mol, renderer, kind, n_states_maps, out_dir, apix)
    consensus_path = os.path.join(out_dir, "consensus.mrc")
    write_map(consensus_path, renderer.consensus(truth, kind), apix)
    maps["neutral"], gmms["neutral"] = _write_neutral(mol, renderer, truth, kind, out_dir, apix)

    dom = mol.domain
    arm = mol.arm_centers(torch.tensor([0.0, 1.0])).numpy()
    arm_xyz = mol.centers_A[mol.arm_slice()]
    arm_rms_A = float(np.sqrt(((arm_xyz - arm_xyz.mean(0)) ** 2).sum(1).mean()))
    summary = {
        "kind": kind, "n": n, "box": box, "apix": apix,
        "snr": snr if math.isfinite(snr) else "inf",
        "signal_variance": signal_var, "noise_sigma": noise_sigma, "calibration_particles": n_cal,
        "n_gaussians": int(len(mol.centers_A)), "sigma_A": mol.sigma_A, "amplitude": mol.amplitude,
        "subunit_mass_fraction": float(np.mean(dom == DOMAIN_NAMES.index("subunit"))),
        "subunit_present_fraction": float(truth["composition"].mean()),
        "arm_displacement_A": float(np.linalg.norm(arm[1].mean(0) - arm[0].mean(0))),
        "arm_rms_radius_A": arm_rms_A,
        "molecule_radius_A": float(np.linalg.norm(mol.centers_A, axis=1).max()),
        "seconds_stack": round(t_stack, 3),
    }
    summary["seconds_total"] = round(time.perf_counter() - t0, 3)
    params = {
        "kind": kind, "n": n, "box": box, "apix": apix, "snr": summary["snr"], "seed": int(seed),
        "molecule_seed": int(molecule_seed), "n_states_maps": int(n_states_maps),
        "subunit_fraction": float(subunit_fraction), "max_shift_px": float(max_shift_px), "ctf_applied": bool(ctf),
        "n_gaussians_requested": int(n_gaussians), "voltage_kv": VOLTAGE_KV, "cs_mm": CS_MM,
        "amplitude_contrast": AMPLITUDE_CONTRAST, "defocus_range_A": list(DEFOCUS_RANGE_A),
        "max_astigmatism_A": MAX_ASTIGMATISM_A, "hinge_angle_deg": mol.hinge_angle_deg,
        "hinge_A": [float(v) for v in mol.hinge_A], "hinge_axis": [float(v) for v in mol.hinge_axis],
        "arm_slide_A": [float(v) for v in mol.slide_A],
        "arm_path": "arm Gaussians x -> R(hinge_axis, (c - 0.5) * hinge_angle_deg) (x - hinge_A) + hinge_A"
                    " + (c - 0.5) * arm_slide_A",
        "domains": mol.ranges(), "states": states,
        "files": {"star": "particles.star", "stack": "particles.mrcs", "consensus": "consensus.mrc",
                  "truth_csv": "truth.csv"},
        "summary": summary,
    }
    json_path = os.path.join(out_dir, "simulation.json")
    write_text(json_path, json.dumps(params, indent=2) + "\n")
    log.info("simulated %d %s particles (box %d, %.3g A/px, SNR %s) in %.1f s -> %s", n, kind, box, apix,
             summary["snr"], summary["seconds_total"], out_dir)
    return {"out_dir": out_dir, "star": star_path, "stack": stack_path, "consensus": consensus_path,
            "truth_csv": csv_path, "json": json_path, "truth_maps": maps, "truth_gmm": gmms, "summary": summary}
