"""Loading a trained model (:class:`TrainedModel`, :func:`load_trained`): the API that the
analysis, the refinement and the viewers use, and the ``model.pt`` it reads.

``model.pt`` (written by :func:`train.train` through :func:`model_payload`, read with
``torch.load(weights_only=True)``: see :mod:`..io.torch_files`, format 2): ``version``
(:data:`MODEL_FILE_VERSION`), ``config_json`` (the :class:`config.TrainConfig` as JSON),
``info_json``, ``state_dict`` (the :class:`networks.HetModel`'s, on the CPU), ``n_features``,
``mobile`` (int64 tensor: the Gaussians that may change) and ``feature_stats`` (the features'
normalisation: ``mean`` tensor, ``scale`` floats, ``n_sample``). The neutral GMM is the training
folder's ``gmm.npz``. A gmmhet 0.1 model.pt (numpy arrays inside) is refused in one line that
says how to retrain or convert it.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..device import AdaptiveBatch, resolve_device
from ..errors import InputError
from ..io.data import Particles
from ..io.outputs import TrainFolder
from ..io.torch_files import CONVERT_HINT, json_field, load_torch_file
from ..model.fourier import RingBinner
from ..model.gmm import GMM
from ..model.networks import HetModel
from .config import TrainConfig
from .features import FeatureSource, GradientFeatures, feature_param_types
from .latent_posterior import LatentAnchors, posterior_latents

MODEL_FILE_VERSION = 2


@torch.no_grad()
def encode_items(model: HetModel, source, items: np.ndarray, batch_size: int) -> np.ndarray:
    """Latents ``(len(items), zdim)`` float32 in the order of ``items`` (eval mode, no noise,
    float32 forward: no autocast, whatever the training's ``amp``)."""
    model.eval()
    out = []

    def step(i0, i1):
        sel = items[i0:i1]
        if source.cache is not None:
            x = source.cache.get(sel, source.device)
        else:
            x = source.feats(source.particles.batch(sel))
        out.append(model.encode(x).float().cpu())

    AdaptiveBatch(batch_size, "encoding latents", source.device).run(len(items), step)
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, model.decoder.zdim), np.float32)


def model_payload(model: HetModel, cfg: TrainConfig, feats: GradientFeatures, mobile: np.ndarray, info: dict,
                  anchors: LatentAnchors | None = None) -> dict:
    """The ``model.pt`` dict (format 2: tensors, plain containers, settings as JSON)."""
    extra = {"latent_anchors": anchors.to_payload()} if anchors is not None else {}
    return {**extra, "version": MODEL_FILE_VERSION, "config_json": json.dumps(cfg.to_dict()),
            "info_json": json.dumps(info, default=float),
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "n_features": int(feats.n_features), "mobile": torch.as_tensor(np.asarray(mobile, dtype=np.int64)),
            "feature_stats": {"mean": torch.as_tensor(np.asarray(feats.stats["mean"], dtype=np.float32)),
                              "scale": {str(k): float(v) for k, v in dict(feats.stats["scale"]).items()},
                              "n_sample": int(feats.stats.get("n_sample", 0))}}


class TrainedModel:
    """A trained network and its neutral GMM, loaded from a training directory.

    ``neutral``: the neutral :class:`GMM`; ``zdim``; ``config`` (the training settings);
    ``train_dir``. ``decode`` maps latents to GMM parameters, ``gmm_at`` gives one GMM,
    ``latents`` the training latents (``latent.npy``), ``encode_particles`` latents of any star.
    """

    def __init__(self, train_dir: str, device="cpu"):
        folder = TrainFolder(train_dir)
        path = folder.model
        if not os.path.exists(path):
            raise InputError(f"--train {train_dir}: no model.pt; give the output folder of a finished 'gmmhet train'")
        self.train_dir = train_dir
        self.device = resolve_device(device)
        payload = load_torch_file(path, os.path.basename(path))  # weights_only=True: runs no code from the file
        try:
            self.config = json_field(payload, "config_json", path)
            self.info = json_field(payload, "info_json", path, {})
            stats = payload["feature_stats"]
            self.feature_stats = {"mean": np.asarray(stats["mean"], dtype=np.float32),
                                  "scale": dict(stats["scale"]), "n_sample": int(stats.get("n_sample", 0))}
            self.mobile = np.asarray(payload["mobile"], dtype=np.int64)
            n_features = int(payload["n_features"])
            self.anchors = LatentAnchors.from_payload(payload.get("latent_anchors"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: incomplete model.pt (missing {exc}); {CONVERT_HINT}") from None
        self.payload = payload
        self.neutral = GMM.load(folder.gmm)
        self.zdim = int(self.config["zdim"])
        c0, a0, s0 = self.neutral.tensors(self.device)
        self.model = HetModel(n_features, self.zdim, c0, a0, s0,
                              torch.as_tensor(self.mobile, device=self.device), tuple(self.config["changes"]),
                              float(self.config["pos_scale_A"]), int(self.config["hidden"]), int(self.config["layers"]),
                              float(self.config.get("dropout", 0.0)), bool(self.config.get("batchnorm", False)),
                              self.config.get("prior", "l2") == "kl")
        self.model.load_state_dict(payload["state_dict"])
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)

    def decode(self, z: torch.Tensor, grad: bool = False):
        """Latents ``(B, K)`` -> ``centers_A (B, N, 3)``, ``amplitudes (B, N)``, ``sigmas_A (B, N)``
        (on ``self.device``). ``grad=True`` keeps the graph (e.g. to optimise ``z``); the
        network's weights are frozen either way."""
        z = torch.as_tensor(z, dtype=torch.float32, device=self.device)
        if z.dim() == 1:
            z = z[None]
        if z.shape[-1] != self.zdim:
            raise InputError(f"latent point of dimension {z.shape[-1]}; this model's latent space has {self.zdim}")
        with torch.set_grad_enabled(grad):
            return self.model.decoder(z)

    def gmm_at(self, z: np.ndarray) -> GMM:
        """The decoded GMM at one latent point ``(K,)``."""
        if isinstance(z, torch.Tensor):
            z = z.detach().cpu().numpy()
        z = np.asarray(z, dtype=np.float32).reshape(1, -1)
        c, a, s = self.decode(torch.as_tensor(z))
        return GMM(c[0].cpu().numpy(), a[0].cpu().numpy(), s[0].cpu().numpy(), self.neutral.box, self.neutral.apix,
                   {"latent": " ".join(f"{v:.6g}" for v in z.reshape(-1))})

    def centering_reference(self) -> GMM:
        """The GMM particles are centred against before encoding (:mod:`centering`): the GMM given
        to ``gmmhet train`` (a finer model's ``first_model/gmm.npz``; else the neutral)."""
        first = TrainFolder(self.train_dir).first_model
        return GMM.load(first.gmm) if os.path.exists(first.gmm) else self.neutral

    def latents(self) -> np.ndarray:
        """``latent.npy`` ``(n_items, K)`` of the training run."""
        return TrainFolder(self.train_dir).read_latents()

    def band_particles(self, star_path: str, device=None, centering_from: TrainFolder | None = None):
        """The particles of a star as the training saw them: its symmetry expansion and CTF mode,
        centred (``centering_from``'s corrections, e.g. the training's own folder for its own
        particles; else searched against :meth:`centering_reference`), cropped to its band.
        Returns (:class:`io.data.Particles`, :class:`fourier.RingBinner`)."""
        dev = self.device if device is None else resolve_device(device)
        particles = Particles.from_star(star_path, symmetry=self.config.get("symmetry"),
                                        ctf_mode=self.config.get("ctf_mode", "auto"), device=dev)
        if particles.box != self.neutral.box or abs(particles.apix - self.neutral.apix) > 1e-3 * self.neutral.apix:
            raise InputError(f"{star_path}: particles are box {particles.box} at {particles.apix:.4f} A/px but the "
                             f"model is box {self.neutral.box} at {self.neutral.apix:.4f} A/px; use matching particles")
        if self.config.get("center", "off") == "auto":  # as in training (runs before 0.2 did not centre)
            from .centering import center_for_training
            center_for_training(particles, self.centering_reference(), "auto", saved_in=centering_from,
                                star_path=star_path)
        particles.crop(self.config["highres_A"])
        binner = RingBinner(particles.fbox, particles.fapix, self.config["lowres_A"], self.config["highres_A"],
                            device=dev, loss=self.config.get("loss", "frc"))
        return particles, binner

    def encode_particles(self, star_path: str, device=None, batch_size: int = 256) -> np.ndarray:
        """Latents of the particles of any star (same box/pixel size as the model), with the
        training run's symmetry expansion, CTF mode and centring; features computed on the fly."""
        dev = self.device if device is None else resolve_device(device)
        if dev != self.device:
            self.model.to(dev)
            self.device = dev
        particles, binner = self.band_particles(star_path, dev)
        if self.anchors is not None:  # the training's estimate: the posterior over its anchors (no encoder pass)
            return posterior_latents(self.model.decoder, particles, binner, np.arange(len(particles)), self.anchors,
                                     batch_size, dev)[0]
        feats = GradientFeatures(self.neutral, binner, torch.as_tensor(self.mobile),
                                 feature_param_types(self.config["changes"]), dev, stats=self.feature_stats)
        source = FeatureSource(particles, feats, None, dev)
        return encode_items(self.model, source, np.arange(len(particles)), batch_size)


def load_trained(train_dir: str, device="cpu") -> TrainedModel:
    """Load the output of ``gmmhet train`` (see :class:`TrainedModel`)."""
    return TrainedModel(train_dir, device)


def effective_dimension(latents, prior: str) -> dict:
    """How many latent directions carry signal: the principal variances of the latents
    (posterior means), counted where >= 0.01 prior variance (``prior 'kl'``: the "active units"
    of Burda et al. 2016, a collapsed direction has ~0) or >= 5% of the largest (``'l2'``, whose
    latents have no unit scale). Returns ``{'effective_dim', 'latent_pc_variance', 'threshold'}``."""
    z = np.asarray(latents, dtype=np.float64)
    if z.ndim != 2 or len(z) < 2:
        return {"effective_dim": 0, "latent_pc_variance": [], "threshold": None}
    ev = np.clip(np.linalg.eigvalsh(np.cov(z, rowvar=False).reshape(z.shape[1], z.shape[1]))[::-1], 0, None)
    thr = 0.01 if prior == "kl" else 0.05 * float(ev[0])
    return {"effective_dim": int(np.sum(ev >= thr)) if ev[0] > 0 else 0,
            "latent_pc_variance": [round(float(v), 6) for v in ev], "threshold": thr}
