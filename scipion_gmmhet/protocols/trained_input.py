"""What the protocols that start from trained particles ("cluster and reconstruct", "refine
orientations") share: finding the training folder, the star it trained on, and each input
particle's latent vector -- always by particle id."""
from __future__ import annotations

import os

import numpy as np

from .. import convert
from ..engine.errors import InputError
from ..engine.io.outputs import TrainFolder


class TrainedParticlesInput:
    """Mixin for protocols whose ``inputParticles`` are the output of "train heterogeneity"
    (or a subset of it)."""

    def convertInputStep(self, inputKey):
        """The canonical star of the input particles and their latent vectors, row by row
        (latents.npy row i = star row i, matched through the particle ids)."""
        from ..engine.io.atomic import save_npy
        parts = self.inputParticles.get()
        starFn = self.getParticlesStar()
        convert.writeSetOfParticles(parts, starFn, self._getExtraPath())
        ids = self._starIds(starFn)
        zById = self._latentsById(parts)
        missing = [pid for pid in ids.tolist() if pid not in zById]
        if missing:
            raise InputError('input particles: %d particle(s) have no latent vector (e.g. id %d); '
                             'give particles from "train heterogeneity"' % (len(missing), missing[0]))
        z = np.stack([zById[int(pid)] for pid in ids]).astype(np.float32)
        save_npy(self.getLatentsFile(), z)
        self.info('Wrote %d particles and their %d-D latent vectors' % z.shape)

    def getParticlesStar(self) -> str:
        """The canonical star of the input particles (row i = latents.npy row i)."""
        return self._getExtraPath('input_particles.star')

    def getLatentsFile(self) -> str:
        return self._getExtraPath('latents.npy')

    def getTrainDir(self) -> str | None:
        """The training folder of the input particles: the set's ``_gmmhet_trainDir``, its
        Flexibility Hub ``trainDir``, or the producing protocol's ``getTrainDir()``."""
        parts = self.inputParticles.get()
        if parts is None:
            return None
        value = convert.trainDirOf(parts)
        if value:
            return value
        prot = self.inputParticles.getObjValue()
        if prot is not None and hasattr(prot, 'getTrainDir'):
            return prot.getTrainDir()
        return None

    def _trainDirErrors(self) -> list[str]:
        """Form errors when the input particles name no finished training folder."""
        trainDir = self.getTrainDir()
        if not trainDir:
            return ['Input particles: they do not name a training folder; give the output '
                    'of "gmmhet - train heterogeneity".']
        if not TrainFolder(trainDir).is_finished():
            return ['Input particles: the training folder %s has no %s; let the training finish.'
                    % (trainDir, os.path.basename(TrainFolder(trainDir).model))]
        return []

    def _modelGrid(self) -> tuple[int, float] | None:
        """``(box, apix)`` of the trained Gaussian model (the training folder's gmm.npz), else
        of the input particles (training requires the two to agree)."""
        from ..engine.io.validate import model_grid
        grid = model_grid(self.getTrainDir() or '')
        parts = self.inputParticles.get()
        if grid is None and parts is not None and parts.getXDim():
            grid = (int(parts.getXDim()), float(parts.getSamplingRate()))
        return grid

    def _trainStar(self) -> str | None:
        parts = self.inputParticles.get()
        if hasattr(parts, 'getFlexInfo'):
            try:
                return parts.getFlexInfo().getAttr('particlesStar')
            except AttributeError:
                pass
        prot = self.inputParticles.getObjValue()
        if prot is not None and hasattr(prot, 'getParticlesStar'):
            return prot.getParticlesStar()
        trainDir = self.getTrainDir()  # the engine records the star it trained on
        return TrainFolder(trainDir).read_config().get('particles') if trainDir else None

    def _latentsById(self, parts) -> dict[int, np.ndarray]:
        """{particle id: latent vector}: the particles' own ``_zFlex`` when they carry it, else
        the training's latent.npy rows through the ids the training recorded (its particle
        keys; runs without them: the training star's ids)."""
        out = {}
        for p in parts.iterItems(orderBy='id'):
            if hasattr(p, 'getZFlex'):
                z = p.getZFlex()
                if z.size:
                    out[p.getObjId()] = np.asarray(z, dtype=np.float32)
        if out:
            return out
        trainDir, trainStar = self.getTrainDir(), self._trainStar()
        hasKeys = bool(trainDir) and os.path.exists(TrainFolder(trainDir).particle_keys)
        if not trainDir or not (hasKeys or (trainStar and os.path.exists(trainStar))):
            raise InputError('input particles: no latent vectors and no training star; give the '
                             'output of "gmmhet - train heterogeneity"')
        from .protocol_train import latentRowsById
        folder = TrainFolder(trainDir)
        z = folder.read_latents(mmap=True)
        nOps = int(folder.read_config().get('n_ops', 1))
        rows = latentRowsById(trainStar, z.shape[0], nOps, trainDir)
        return {pid: np.asarray(z[r], dtype=np.float32) for pid, r in rows.items()}

    @staticmethod
    def _starIds(starFn: str) -> np.ndarray:
        """Particle ids of a canonical star's rows (row order)."""
        return convert.readParticleIds(starFn)
