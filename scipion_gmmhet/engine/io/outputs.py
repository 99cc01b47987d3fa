"""Result folders: the name, writer and reader of every result file of the engine (no torch).

Each command writes its folder through this module, and the protocols, viewers, the demo
report and the benchmarks read it through this module, so a result file's name is spelled
here only. Writes are atomic (:mod:`atomic`). The layouts (see docs/architecture.md):

``gmmhet build --out DIR`` (:class:`BuildFolder`)
    ``gmm.npz`` (the GMM), ``gmm_map.mrc`` (rendered at the map's box and pixel size),
    ``fsc.csv`` (FSC between that map and the input map), ``summary.json``.
``gmmhet train --out DIR`` (:class:`TrainFolder`)
    ``config.json`` (settings, fingerprint of the inputs, counts), ``gmm.npz`` (the neutral
    GMM), ``feature_stats.npz``, ``features.f16`` + ``features.json`` (feature cache),
    ``checkpoints/epoch_NNNN.pt``, ``loss.csv``, ``model.pt``, ``latent.npy``,
    ``particle_keys.txt`` (the identity of each training particle: results pair with particles by it).
``gmmhet analyze --out DIR`` (:class:`AnalysisFolder`)
    ``labels.npy``, ``centers.npy``, ``cluster_XX_rows.txt``, ``embedding_{pca,umap}.npy`` and ``.png``,
    ``cluster_XX_gmm.mrc``, reconstructions ``cluster_XX.mrc`` (:func:`reconstruction_paths`),
    ``pcN_SS.mrc``, ``pcN_points.npy``, ``pcN_motion.{bild,cmm,png}``, ``domain_SS.mrc``,
    ``domain_motion.bild``, ``domain_direction.npy``, ``fsc.png``, ``reproducibility.json``,
    ``chimerax_clusters.cxc``, ``summary.json``.
``gmmhet refine --out DIR`` (:class:`RefineFolder`)
    ``particles.star``, ``pose_changes.csv``, ``refine_result.npz``, ``refine_settings.json``;
    with ``--rounds`` also ``rounds.csv`` and ``round_R/`` (each a refine folder plus
    ``train/``, a train folder).
``gmmhet reconstruct --out MAP.mrc`` (:func:`reconstruction_paths`)
    ``MAP.mrc``, ``MAP_half1.mrc``, ``MAP_half2.mrc``, ``MAP_mask.mrc``, ``MAP_fsc.csv``.
"""
from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np

from ..ctf_modes import CTF_MODE_ALIASES
from .atomic import atomic_write, save_npy, write_text
from .torch_files import save_torch_file

GMM_NPZ = "gmm.npz"
SUMMARY_JSON = "summary.json"
FSC_CSV = "fsc.csv"
FSC_COLUMNS = ("shell", "freq_invA", "resolution_A", "fsc")


# ---------------------------------------------------------------------------------------------
# shared formats

def read_json(path: str, default=None):
    """The JSON document at ``path``; ``default`` when the file does not exist."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj, indent: int = 1) -> None:
    """``obj`` as JSON (numpy scalars as floats), atomically."""
    write_text(path, json.dumps(obj, indent=indent, default=float))


def write_csv(path: str, table) -> None:
    """A pandas DataFrame as CSV (no index, ``%.6g`` floats), atomically."""
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))


def write_fsc_csv(path: str, table: dict, masked=None) -> None:
    """An FSC table (:func:`model.fourier.fsc_table`: ``shell, freq_invA, resolution_A, fsc``
    [, ``fsc_masked``: the phase-randomisation-corrected masked FSC]) as CSV, atomically."""
    lines = [",".join(FSC_COLUMNS) + (",fsc_masked" if masked is not None else "")]
    for i, (s, fr, res, c) in enumerate(zip(*(table[k] for k in FSC_COLUMNS))):
        extra = f",{masked[i]:.6f}" if masked is not None else ""
        lines.append(f"{int(s)},{fr:.6g},{res:.6g},{c:.6f}{extra}")
    write_text(path, "\n".join(lines) + "\n")


def read_fsc_csv(path: str, missing_ok: bool = False) -> dict[str, np.ndarray]:
    """Columns of an FSC CSV (:func:`write_fsc_csv`) as float arrays; ``{}`` for a missing
    file when ``missing_ok``."""
    if missing_ok and not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    names = list(rows[0].keys()) if rows else list(FSC_COLUMNS)
    return {k: np.array([float(r[k]) for r in rows], dtype=np.float64) for k in names}


def read_loss_csv(path: str) -> dict[str, np.ndarray]:
    """Columns of a loss table (``epoch,train_loss,val_loss,seconds`` as ``gmmhet train``
    writes it; any numeric columns) as float arrays; empty cells become NaN. ValueError when
    it has no rows (no epoch finished yet)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError("%s: no rows; the training has not finished an epoch yet" % path)
    out: dict[str, np.ndarray] = {}
    for name in rows[0].keys():
        vals = []
        for r in rows:
            try:
                vals.append(float(r[name]))
            except (TypeError, ValueError):
                vals.append(np.nan)
        out[name.strip()] = np.asarray(vals, dtype=np.float64)
    return out


class _Folder:
    def __init__(self, folder: str):
        self.folder = str(folder)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder!r})"


# ---------------------------------------------------------------------------------------------
# gmmhet build

class BuildFolder(_Folder):
    """``gmmhet build``'s output folder."""

    @property
    def gmm(self) -> str:
        return self.path(GMM_NPZ)

    @property
    def gmm_map(self) -> str:
        return self.path("gmm_map.mrc")

    @property
    def fsc(self) -> str:
        return self.path(FSC_CSV)

    @property
    def summary(self) -> str:
        return self.path(SUMMARY_JSON)

    def read_summary(self) -> dict:
        return read_json(self.summary, {})

    def read_fsc(self) -> dict[str, np.ndarray]:
        """FSC(model map, input map) columns; ``{}`` before the build wrote it."""
        return read_fsc_csv(self.fsc, missing_ok=True)


def gmm_file(path: str) -> str:
    """``path`` itself, or the ``gmm.npz`` inside it when it is a folder (a build or train folder)."""
    return os.path.join(path, GMM_NPZ) if os.path.isdir(path) else path


# ---------------------------------------------------------------------------------------------
# gmmhet train

#: first line of a training's particle_keys.txt
PARTICLE_KEYS_HEADER = "# gmmhet particle keys 1: the identity of each particle row of the training star\n"

#: settings that must match to resume a run (besides the inputs' fingerprint)
RESUME_KEYS = ("zdim", "batch_size", "lr", "hidden", "layers", "latent_noise", "latent_reg", "val_fraction",
               "changes", "symmetry", "seed")


def _normalised(v):
    """A setting as compared for resuming: lists element-wise, floats to 12 digits, text
    stripped and upper-case (``c2`` is ``C2``)."""
    if isinstance(v, (list, tuple)):
        return [_normalised(x) for x in v]
    if isinstance(v, float):
        return round(v, 12)
    if isinstance(v, str):
        return v.strip().upper()
    return v


class TrainFolder(_Folder):
    """``gmmhet train``'s output folder (what ``--train`` of eval/analyze/refine takes)."""

    #: files that carry a run's state from one protocol run to the run that continues it
    STATE_FILES = ("config.json", GMM_NPZ, "feature_stats.npz", "loss.csv", "centering.csv")
    #: the feature cache (large; rebuilt when absent)
    CACHE_FILES = ("features.f16", "features.json")

    @property
    def config(self) -> str:
        return self.path("config.json")

    @property
    def gmm(self) -> str:
        return self.path(GMM_NPZ)

    @property
    def latent(self) -> str:
        return self.path("latent.npy")

    @property
    def model(self) -> str:
        return self.path("model.pt")

    @property
    def loss(self) -> str:
        return self.path("loss.csv")

    @property
    def feature_stats(self) -> str:
        return self.path("feature_stats.npz")

    @property
    def feature_cache(self) -> str:
        return self.path(self.CACHE_FILES[0])

    @property
    def feature_cache_meta(self) -> str:
        return self.path(self.CACHE_FILES[1])

    @property
    def checkpoint_dir(self) -> str:
        return self.path("checkpoints")

    def checkpoint(self, epoch: int) -> str:
        """Checkpoint after ``epoch`` complete epochs (1-based)."""
        return os.path.join(self.checkpoint_dir, f"epoch_{int(epoch):04d}.pt")

    def checkpoints(self) -> list[str]:
        """Checkpoint files, oldest first."""
        return sorted(glob.glob(os.path.join(self.checkpoint_dir, "epoch_*.pt")))

    def is_finished(self) -> bool:
        return os.path.exists(self.model)

    @property
    def first_model(self) -> "TrainFolder":
        """``gmmhet train --finer-model auto``: the first training, on the given GMM (a whole
        training folder; this folder's own model is the one trained on the finer GMM)."""
        return TrainFolder(self.path("first_model"))

    @property
    def summary(self) -> str:
        return self.path(SUMMARY_JSON)

    def read_summary(self) -> dict:
        """``summary.json`` (kept epoch, effective dimension, band; ``{}`` before the run ends)."""
        return read_json(self.summary, {})

    def write_summary(self, summary: dict) -> None:
        write_text(self.summary, json.dumps(summary, indent=1, default=float))

    def read_config(self) -> dict:
        """``config.json`` (``{}`` before the run wrote it)."""
        return read_json(self.config, {})

    def write_config(self, info: dict) -> None:
        write_text(self.config, json.dumps(info, indent=1))

    def read_latents(self, mmap: bool = False) -> np.ndarray:
        """``latent.npy`` ``(n_items, zdim)`` float32 (memory-mapped with ``mmap``)."""
        return np.load(self.latent, mmap_mode="r" if mmap else None)

    def write_latents(self, z: np.ndarray) -> None:
        save_npy(self.latent, z)

    @property
    def particle_keys(self) -> str:
        """``particle_keys.txt``: the identity of each particle row of the training star
        (:meth:`metadata.ParticleMetadata.particle_keys`), one per line after a ``#`` header."""
        return self.path("particle_keys.txt")

    def write_particle_keys(self, keys) -> None:
        """Record the training particles' keys (``None``: remove a stale record, e.g. a run on
        arrays in a folder that held a run on a star), atomically."""
        if keys is None:
            if os.path.exists(self.particle_keys):
                os.remove(self.particle_keys)
            return
        write_text(self.particle_keys, PARTICLE_KEYS_HEADER + "".join(f"{k}\n" for k in keys))

    def read_particle_keys(self) -> np.ndarray | None:
        """The keys of :meth:`write_particle_keys` ``(N,)`` str; None for runs that predate them."""
        if not os.path.exists(self.particle_keys):
            return None
        with open(self.particle_keys, encoding="utf-8", newline="\n") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return np.array([k for k in lines if not k.startswith("#")], dtype=object)

    @property
    def centering(self) -> str:
        """``centering.csv``: the shift corrections of :mod:`training.centering` (row, dx_A, dy_A;
        Angstrom added to the RELION origins of training-star row ``row``, 0-based)."""
        return self.path("centering.csv")

    def write_centering(self, shifts_A: np.ndarray) -> None:
        d = np.asarray(shifts_A, dtype=np.float64).reshape(-1, 2)
        write_text(self.centering, "row,dx_A,dy_A\n" + "".join(f"{i},{x!r},{y!r}\n" for i, (x, y) in
                                                               enumerate(d.tolist())))

    def read_centering(self) -> np.ndarray | None:
        """``(N, 2)`` float64 corrections of :meth:`write_centering`; None when the run has none."""
        if not os.path.exists(self.centering):
            return None
        try:
            t = np.loadtxt(self.centering, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
        except ValueError:
            return None
        if t.size == 0 or t.shape[1] != 3 or not np.array_equal(t[:, 0], np.arange(len(t))):
            return None
        return t[:, 1:3]

    def write_loss(self, history: list) -> None:
        """``loss.csv``: epoch, train_loss, val_loss, seconds, best (one row per finished epoch;
        ``best`` 1 on the epoch whose model was kept: the lowest validation loss, early stopping)."""
        lines = ["epoch,train_loss,val_loss,seconds,best"]
        lines += [f"{h['epoch']},{h['train_loss']:.6f},{h['val_loss']:.6f},{h['seconds']:.3f},{int(h.get('best', 0))}"
                  for h in history]
        write_text(self.loss, "\n".join(lines) + "\n")

    def read_loss(self) -> list[dict]:
        """Rows of ``loss.csv`` as dicts of floats (``[]`` before the first epoch ends)."""
        if not os.path.exists(self.loss):
            return []
        try:
            cols = read_loss_csv(self.loss)
        except ValueError:  # no rows yet
            return []
        n = len(next(iter(cols.values())))
        return [{k: float(v[i]) for k, v in cols.items()} for i in range(n)]

    def write_feature_stats(self, stats: dict, fingerprint: dict) -> None:
        """``feature_stats.npz``: the features' normalisation (``mean``, per-type ``scale``,
        ``n_sample``) and the fingerprint of the inputs it was computed from."""
        atomic_write(self.feature_stats,
                     lambda tmp: np.savez(tmp, mean=stats["mean"], scale_json=json.dumps(stats["scale"]),
                                          n_sample=stats["n_sample"], fingerprint=json.dumps(fingerprint, sort_keys=True)),
                     suffix=".tmp.npz")

    def read_feature_stats(self, fingerprint: dict) -> dict | None:
        """The statistics of :meth:`write_feature_stats`; None when absent or computed from
        other inputs (another ``fingerprint``)."""
        if not os.path.exists(self.feature_stats):
            return None
        with np.load(self.feature_stats) as z:
            if str(z["fingerprint"]) != json.dumps(fingerprint, sort_keys=True):
                return None
            return {"mean": z["mean"], "scale": json.loads(str(z["scale_json"])), "n_sample": int(z["n_sample"])}

    def write_checkpoint(self, epoch: int, state: dict) -> None:
        """``state`` (model, optimiser, history, ...) after ``epoch`` complete epochs (format 2:
        :func:`torch_files.save_torch_file`, read back with ``weights_only=True``)."""
        save_torch_file(state, self.checkpoint(epoch))

    def write_model(self, payload: dict) -> None:
        """``model.pt`` (format 2; see :mod:`training.trained`)."""
        save_torch_file(payload, self.model)

    def changed_settings(self, settings: dict) -> list[str]:
        """``'key old -> new'`` for each of :data:`RESUME_KEYS` in ``settings`` that differs from
        the run recorded in ``config.json`` (``[]`` when there is none): the resume check that
        ``gmmhet train --resume`` and the train protocol's Continue share."""
        old = self.read_config().get("train")
        if old is None:
            return []
        return [f"{k} {old.get(k)} -> {settings[k]}" for k in RESUME_KEYS
                if k in settings and _normalised(old.get(k)) != _normalised(settings[k])]

    def resume_error(self, settings: dict, fingerprint: dict) -> str | None:
        """Why this folder cannot be resumed with ``settings`` (:meth:`TrainConfig.to_dict`) on
        inputs with ``fingerprint``; None when it can (or holds no run yet)."""
        old = self.read_config()
        if not old:
            return None
        diff = self.changed_settings(settings)
        old_fp = dict(old.get("fingerprint") or {})
        if "ctf_mode" in old_fp:  # runs of version 0.1 recorded ctf/flipped
            old_fp["ctf_mode"] = CTF_MODE_ALIASES.get(old_fp["ctf_mode"], old_fp["ctf_mode"])
        if old_fp != fingerprint or diff:
            what = f" ({'; '.join(diff)})" if diff else ""
            return (f"--resume: {self.folder} holds a run with other inputs or settings{what}; give the same "
                    "settings, or a new --out without --resume")
        return None


# ---------------------------------------------------------------------------------------------
# gmmhet analyze

class AnalysisFolder(_Folder):
    """``gmmhet analyze``'s output folder."""

    @property
    def labels(self) -> str:
        return self.path("labels.npy")

    @property
    def centers(self) -> str:
        return self.path("centers.npy")

    def embedding(self, method: str) -> str:
        return self.path(f"embedding_{method}.npy")

    def embedding_png(self, method: str) -> str:
        return self.path(f"embedding_{method}.png")

    def cluster_rows(self, c: int) -> str:
        """``cluster_XX_rows.txt``: the 0-based star rows of cluster ``c`` (for ``reconstruct --indices``)."""
        return self.path(f"cluster_{int(c):02d}_rows.txt")

    def cluster_gmm_map(self, c: int) -> str:
        return self.path(f"cluster_{int(c):02d}_gmm.mrc")

    def cluster_map(self, c: int) -> str:
        """Reconstruction of cluster ``c`` (0-based; see :func:`reconstruction_paths`)."""
        return self.path(f"cluster_{int(c):02d}.mrc")

    def trajectory_map(self, pc: int, step: int) -> str:
        return self.path(f"pc{int(pc)}_{int(step):02d}.mrc")

    def trajectory_points(self, pc: int) -> str:
        return self.path(f"pc{int(pc)}_points.npy")

    def trajectory_motion(self, pc: int, ext: str) -> str:
        """``pcN_motion.bild`` / ``.cmm`` / ``.png`` (``ext`` without the dot)."""
        return self.path(f"pc{int(pc)}_motion.{ext}")

    def domain_map(self, step: int) -> str:
        return self.path(f"domain_{int(step):02d}.mrc")

    @property
    def domain_motion(self) -> str:
        return self.path("domain_motion.bild")

    @property
    def domain_direction(self) -> str:
        return self.path("domain_direction.npy")

    @property
    def fsc_png(self) -> str:
        return self.path("fsc.png")

    @property
    def reproducibility(self) -> str:
        return self.path("reproducibility.json")

    @property
    def chimerax_script(self) -> str:
        return self.path("chimerax_clusters.cxc")

    @property
    def summary(self) -> str:
        return self.path(SUMMARY_JSON)

    def read_summary(self) -> dict:
        """``summary.json`` (``{}`` before the analysis wrote it)."""
        return read_json(self.summary, {})


# ---------------------------------------------------------------------------------------------
# gmmhet refine

class RefineFolder(_Folder):
    """``gmmhet refine``'s output folder (also each ``round_R/`` of an iterated refinement)."""

    @property
    def particles(self) -> str:
        return self.path("particles.star")

    @property
    def pose_changes(self) -> str:
        return self.path("pose_changes.csv")

    @property
    def rounds(self) -> str:
        return self.path("rounds.csv")

    @property
    def settings(self) -> str:
        """``refine_settings.json``: the settings ``--resume`` must find unchanged."""
        return self.path("refine_settings.json")

    @property
    def round_result(self) -> str:
        """``refine_result.npz``: a finished round's exact result (written last)."""
        return self.path("refine_result.npz")

    def round(self, r: int) -> "RefineFolder":
        return RefineFolder(self.path(f"round_{int(r)}"))

    @property
    def train(self) -> TrainFolder:
        """The retraining of a round (``round_R/train``)."""
        return TrainFolder(self.path("train"))

    def write_pose_changes(self, table) -> None:
        """``pose_changes.csv`` from a DataFrame (row, particle_id, delta_angle_deg,
        delta_shift_A, score_before, score_after, rot, tilt, psi, origin_x_A, origin_y_A)."""
        write_csv(self.pose_changes, table)

    def write_rounds(self, table) -> None:
        """``rounds.csv``: one row per round of an iterated refinement (:func:`pose_change_summary`)."""
        write_csv(self.rounds, table)

    def read_pose_changes(self) -> dict[str, np.ndarray] | None:
        """``pose_changes.csv`` as ``{column: array}``; None before the refinement wrote it."""
        if not os.path.exists(self.pose_changes):
            return None
        import pandas as pd
        df = pd.read_csv(self.pose_changes)
        return {c: df[c].to_numpy() for c in df.columns}



class DomainFolder(_Folder):
    """``gmmhet refine-domain``'s output folder (local refinement of a domain)."""

    @property
    def particles(self) -> str:
        """``domain_particles.star``: the input star with each particle's DOMAIN pose."""
        return self.path("domain_particles.star")

    @property
    def domain_poses(self) -> str:
        """``domain_poses.csv``: per row the decoded domain rotation, the search's change and scores."""
        return self.path("domain_poses.csv")

    @property
    def domain_map(self) -> str:
        """``domain.mrc`` (+ ``_half1/_half2/_mask/_fsc``): the domain poses' reconstruction."""
        return self.path("domain.mrc")

    @property
    def plain_map(self) -> str:
        """``plain.mrc`` (+ halves, mask, FSC): the same subtracted particles at the particle poses."""
        return self.path("plain.mrc")

    @property
    def summary(self) -> str:
        return self.path("domain_summary.json")


#: a particle "moved" when its pose changed by more than this (degrees, Angstrom): below any
#: search step, above the rounding of poses written to a star and read back
MOVED_TOLERANCE_DEG, MOVED_TOLERANCE_A = 1e-3, 1e-3


def n_moved(delta_angle_deg, delta_shift_A) -> int:
    """How many particles moved (changes above :data:`MOVED_TOLERANCE_DEG` / ``_A``)."""
    a, s = np.asarray(delta_angle_deg, float), np.asarray(delta_shift_A, float)
    return int(np.count_nonzero((a > MOVED_TOLERANCE_DEG) | (s > MOVED_TOLERANCE_A)))


def pose_change_summary(delta_angle_deg, delta_shift_A, score_before, score_after) -> dict:
    """Median / 90th-percentile pose changes (degrees, Angstrom), how many particles moved, and
    mean scores: what the refine command logs and the protocol's summary shows."""
    a, s = np.asarray(delta_angle_deg, float), np.asarray(delta_shift_A, float)
    return {"angle_median_deg": float(np.median(a)), "angle_p90_deg": float(np.percentile(a, 90)),
            "shift_median_A": float(np.median(s)), "shift_p90_A": float(np.percentile(s, 90)),
            "n_moved": n_moved(a, s),
            "score_before_mean": float(np.mean(score_before)), "score_after_mean": float(np.mean(score_after))}


# ---------------------------------------------------------------------------------------------
# gmmhet reconstruct (and the analysis's per-cluster reconstructions)

def reconstruction_paths(out_path: str, mask: bool = True) -> dict[str, str]:
    """Files of a reconstruction written at ``MAP.mrc``, by role: ``map``, ``half1``, ``half2``,
    ``fsc`` (``MAP_fsc.csv``) and, with ``mask``, ``mask`` (the automatic solvent mask)."""
    root = out_path[:-4] if out_path.endswith(".mrc") else out_path
    paths = {"map": root + ".mrc", "half1": root + "_half1.mrc", "half2": root + "_half2.mrc",
             "fsc": root + "_fsc.csv"}
    if mask:
        paths["mask"] = root + "_mask.mrc"
    return paths
