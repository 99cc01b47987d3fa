# **************************************************************************
# *
# * scipion-em-gmmhet: GMM-based heterogeneity analysis for Scipion
# *
# * This program is free software; you can redistribute it and/or modify
# * it under the terms of the GNU General Public License as published by
# * the Free Software Foundation; either version 3 of the License, or
# * (at your option) any later version.
# *
# **************************************************************************
"""Protocol "gmmhet - build Gaussian model": a Gaussian mixture matching a consensus map at a
chosen resolution, the neutral model that "train heterogeneity" deforms.

Runs ``gmmhet build`` (see ``scipion_gmmhet.engine.model.build``) into ``extra/gmm/``. Output:
``outputVolume``, the model rendered on the input map's grid (same box, sampling and origin),
with the model file attached as the attribute ``_gmmhet_gmmFile`` (a String holding the path of
``gmm.npz``; :func:`scipion_gmmhet.protocols.protocol_train.getGmmFile` reads it).
"""
from __future__ import annotations

import os
import shlex

import pyworkflow.protocol.params as params
from pyworkflow.object import Float, Integer, String
from pwem.objects import Volume
from pwem.protocols import ProtAnalysis3D

from .. import Plugin, convert
from ..constants import GMM_FILE_ATTR  # the output volume's gmm.npz path; "train" reads it
from ..engine.io.outputs import BuildFolder
from .gpu import cudaAvailable, gpuErrors, protocolGpus
from .validation import maskGridErrors, volumeGrid
from .labels import GmmhetLabel

#: Extensions the engine reads directly (anything else is converted to MRC first).
_MRC_EXTENSIONS = ('.mrc', '.map', '.rec')


class ProtGmmhetBuildGmm(GmmhetLabel, ProtAnalysis3D):
    """Build a Gaussian mixture model (GMM) of a map: Gaussians whose sum matches the map up to
    a target resolution (e2gmm's model-building, Chen & Ludtke, Nat Methods 2021).

    The build is progressive: a few Gaussians at low resolution, then the number is doubled
    (new Gaussians seeded next to existing ones) while the resolution is raised to the target.
    The fit maximises the Fourier shell correlation between the model and the map over the
    shells up to the current resolution. With a mask, only the density inside it is modelled
    and Gaussians outside are dropped.

    The output volume is the model rendered on the input map's grid; it carries the model file
    for "gmmhet - train heterogeneity". The viewer plots the FSC between the model and the map
    and shows the Gaussian centres over the map in ChimeraX.
    """
    _label = 'build Gaussian model'
    _possibleOutputs = {'outputVolume': Volume}

    def __init__(self, **kwargs):
        ProtAnalysis3D.__init__(self, **kwargs)
        self.nGaussians = Integer()
        self.fsc05Resolution = Float()

    # -------------------------- DEFINE param functions -----------------------
    def _defineParams(self, form):
        form.addHidden(params.USE_GPU, params.BooleanParam, default=cudaAvailable(),
                       label='Use GPU?',
                       help='Fit on a GPU (CUDA). Set to No to fit on the CPU (a 2048-Gaussian '
                            'model of a 128-px map takes a few minutes there).')
        form.addHidden(params.GPU_LIST, params.StringParam, default=Plugin.getDefaultGpu(),
                       label='Choose GPU IDs',
                       help='GPU ids to use, as in other Scipion plugins (e.g. "0"). The build '
                            'runs on the first one listed.')

        form.addSection(label='Input')
        form.addParam('inputVolume', params.PointerParam, pointerClass='Volume',
                      important=True,
                      label='Input map',
                      help='The consensus map of the particles to analyse (any plugin\'s '
                           'refinement or post-processing output), a cubic box. Use the map at '
                           'the particles\' box and pixel size: the model is used in that frame.')
        form.addParam('inputMask', params.PointerParam, pointerClass='VolumeMask, Volume',
                      allowsNull=True,
                      label='Mask (optional)',
                      help='Only the density inside the mask (values 0-1) is modelled; Gaussians '
                           'whose centre falls outside it are dropped. Same box and pixel size '
                           'as the map. Leave empty to model the whole map.')
        form.addParam('resolution', params.FloatParam, default=8.0, validators=[params.GT(0)],
                      label='Target resolution (A)',
                      help='Resolution up to which the model matches the map. e2gmm builds '
                           'models at 8-13 A for heterogeneity analysis: finer needs more '
                           'Gaussians and more time without helping the latent space much. '
                           'At least twice the pixel size.')
        form.addParam('numberOfGaussians', params.IntParam, default=0,
                      validators=[params.GE(0)],
                      label='Number of Gaussians',
                      help='0 (default): chosen from the map and the target resolution, '
                           '2 x (volume above the density threshold) / resolution^3 (e.g. ~2000 '
                           'for a 1 MDa complex at 10 A). Give a number to override it; a mask '
                           'may leave slightly fewer.')

        form.addParam('steps', params.IntParam, default=300, validators=[params.GE(1)],
                      expertLevel=params.LEVEL_ADVANCED,
                      label='Adam steps per stage',
                      help='Optimisation steps per stage (the last stage, at the target '
                           'resolution, runs up to twice as many). A stage stops early once '
                           'the fit stops improving.')
        form.addParam('seed', params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED,
                      label='Random seed',
                      help='Fixes the initial Gaussians and the splits: the same seed gives the '
                           'same model on the CPU.')
        form.addParallelSection(threads=4, mpi=0)

    # -------------------------- INSERT steps functions -----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.buildStep, self._getBuildArgs())
        self._insertFunctionStep(self.createOutputStep)

    # -------------------------- STEPS functions ------------------------------
    def convertInputStep(self):
        """Maps the engine cannot read directly (not MRC) are converted into extra/;
        MRC inputs are used in place (and never written to)."""
        os.makedirs(self.getBuildDir(), exist_ok=True)
        for obj, name in ((self.inputVolume.get(), 'input_map.mrc'),
                          (self.inputMask.get(), 'input_mask.mrc')):
            if obj is not None and not _isMrc(obj):
                from pwem.emlib.image import ImageHandler
                ImageHandler().convert(obj, self._getExtraPath(name))

    def buildStep(self, args):
        Plugin.runGmmhet(self, 'build', args,
                         gpuList=protocolGpus(self, first=True))

    def createOutputStep(self):
        inVol = self.inputVolume.get()
        outVol = Volume()
        outVol.setFileName(self.getGmmMapFile())
        outVol.setSamplingRate(inVol.getSamplingRate())
        origin = inVol.getOrigin(force=True)
        if origin is not None:
            outVol.setOrigin(origin)
        setattr(outVol, GMM_FILE_ATTR, String(self.getGmmFile()))
        summary = self.getBuildSummary()
        self.nGaussians.set(int(summary.get('n_gauss', 0)))
        self.fsc05Resolution.set(float(summary.get('fsc05_resolution_A', 0.0)))
        self._store(self.nGaussians, self.fsc05Resolution)
        self._defineOutputs(outputVolume=outVol)
        self._defineSourceRelation(self.inputVolume, outVol)
        if self.inputMask.get() is not None:
            self._defineSourceRelation(self.inputMask, outVol)

    # -------------------------- INFO functions -------------------------------
    def _validate(self):
        errors = gpuErrors(self, 'GPU IDs: give a GPU id (e.g. 0), or set Use GPU to No.')
        vol = self.inputVolume.get()
        if vol is None:
            return errors + ['Input map: select a volume.']
        dims = vol.getDim()
        apix = vol.getSamplingRate()
        if dims is not None and len(set(dims)) != 1:
            errors.append('Input map: non-cubic box %s; pad or crop it to a cube (e.g. with '
                          'xmipp3 - crop/resize volumes).' % 'x'.join(str(d) for d in dims))
        mask = self.inputMask.get()
        if mask is not None and dims is not None:  # the check and text of `gmmhet build --mask`
            errors += maskGridErrors('Mask', mask, volumeGrid(vol), 'the map')
        res = self.resolution.get()
        if res is not None and apix:
            if res < 2.0 * apix:
                errors.append('Target resolution: %.3g A is beyond Nyquist (%.3g A at %.4g '
                              'A/px); give at least %.3g A.' % (res, 2 * apix, apix, 2 * apix))
            elif dims is not None and res > dims[0] * apix / 2.0:
                errors.append('Target resolution: %.3g A is coarser than half the box (%.4g A); '
                              'give a finer resolution.' % (res, dims[0] * apix / 2.0))
        return errors

    def _summary(self):
        summary = ['Target resolution: %.3g A' % self.resolution.get()]
        if self.inputMask.get() is not None:
            summary.append('Masked: Gaussians outside the mask dropped')
        info = self.getBuildSummary()
        if info:
            summary.append('Gaussians: %d%s' % (info['n_gauss'], '' if self.numberOfGaussians.get()
                                                else ' (chosen from the map)'))
            summary.append('FSC(model, map) = 0.5 at %.3g A' % float(info['fsc05_resolution_A']))
            summary.append('Build time: %.0f s' % float(info.get('seconds', 0)))
        elif not self.isFinished():
            summary.append('Number of Gaussians: %s' % (self.numberOfGaussians.get() or 'automatic'))
        return summary

    def _methods(self):
        info = self.getBuildSummary()
        if not info:
            return []
        return ['A Gaussian mixture model of %d Gaussians was built from the map %s to %.3g A '
                'resolution (scipion-em-gmmhet, following e2gmm [Chen2021]): the number of '
                'Gaussians was doubled and the resolution raised stage by stage while the '
                'Fourier shell correlation with the map was maximised. The FSC between the '
                'model and the map falls to 0.5 at %.3g A.'
                % (info['n_gauss'], self.getObjectTag('inputVolume'), self.resolution.get(),
                   float(info['fsc05_resolution_A']))]

    def _citations(self):
        return ['Chen2021']

    # -------------------------- UTILS functions ------------------------------
    def getBuildDir(self) -> str:
        """``gmmhet build``'s output folder (gmm.npz, gmm_map.mrc, fsc.csv, summary.json)."""
        return self._getExtraPath('gmm')

    def getGmmFile(self) -> str:
        return BuildFolder(self.getBuildDir()).gmm

    def getGmmMapFile(self) -> str:
        return BuildFolder(self.getBuildDir()).gmm_map

    def getFscFile(self) -> str:
        return BuildFolder(self.getBuildDir()).fsc

    def getInputMapFile(self) -> str:
        """The map the engine reads: the input file itself when it is MRC, else its copy."""
        return _engineFile(self.inputVolume.get(), self._getExtraPath('input_map.mrc'))

    def getInputMaskFile(self) -> str | None:
        mask = self.inputMask.get()
        return None if mask is None else _engineFile(mask, self._getExtraPath('input_mask.mrc'))

    def getBuildSummary(self) -> dict:
        """summary.json of the build ({} before it exists)."""
        return BuildFolder(self.getBuildDir()).read_summary()

    def getFsc(self) -> dict:
        """fsc.csv as columns (shell, freq_invA, resolution_A, fsc arrays); {} before it exists."""
        return BuildFolder(self.getBuildDir()).read_fsc()

    def _getBuildArgs(self) -> str:
        vol = self.inputVolume.get()
        args = ['--map %s' % shlex.quote(self.getInputMapFile()),
                '--apix %.6f' % vol.getSamplingRate(),
                '--resolution %s' % self.resolution.get(),
                '--steps %d' % self.steps.get(),
                '--seed %d' % self.seed.get(),
                '--device %s' % ('cuda' if self.usesGpu() else 'cpu'),
                '--out %s' % shlex.quote(self.getBuildDir())]
        if self.numberOfGaussians.get():
            args.append('--n-gauss %d' % self.numberOfGaussians.get())
        mask = self.getInputMaskFile()
        if mask:
            args.append('--mask %s' % shlex.quote(mask))
        return ' '.join(args)


# ---------------------------------------------------------------------------- helpers
def _isMrc(obj) -> bool:
    """True when the engine can read the object's file as it is (an MRC map)."""
    fn = str(obj.getFileName())
    clean = convert.cleanFileName(fn)
    suffix = fn[len(clean):].lstrip(':').lower()
    return suffix in ('', 'mrc') and os.path.splitext(clean)[1].lower() in _MRC_EXTENSIONS


def _engineFile(obj, convertedFn: str) -> str:
    return os.path.abspath(convert.cleanFileName(obj.getFileName())) if _isMrc(obj) else \
        os.path.abspath(convertedFn)


