"""Wizards of scipion-em-gmmhet: values computed for the protocols' forms. pyworkflow discovers
the Wizard subclasses defined here."""
from __future__ import annotations

from pwem.wizards import EmWizard

from .protocols import ProtGmmhetBuildGmm


def suggestedNumberOfGaussians(protocol) -> int:
    """The number of Gaussians "build Gaussian model" chooses itself for the form's map, mask
    and target resolution (``engine.model.build.choose_n_gaussians``: twice the molecular volume
    above the map's density threshold over the resolution cubed, in [32, 16384])."""
    from .engine.model.build import choose_n_gaussians
    from .engine.errors import InputError
    from .engine.io.mrc import read_map

    volume = protocol.inputVolume.get()
    if volume is None:
        raise InputError('select the input map first')
    resolution = float(protocol.resolution.get() or 0)
    if resolution <= 0:
        raise InputError('set the target resolution (A) first')
    vol, apix = read_map(_mrcPath(volume), apix=volume.getSamplingRate())
    mask = None
    maskObj = protocol.inputMask.get() if hasattr(protocol, 'inputMask') else None
    if maskObj is not None:
        mask, _ = read_map(_mrcPath(maskObj), apix=maskObj.getSamplingRate())
        if mask.shape != vol.shape:
            mask = None  # the form's validation reports the mismatch
    return choose_n_gaussians(vol, apix, resolution, mask=mask)


def _mrcPath(volume) -> str:
    """The volume's file without Scipion's ``:mrc`` format suffix."""
    return volume.getFileName().split(':')[0]


class GmmhetNumberOfGaussiansWizard(EmWizard):
    """Fill in the number of Gaussians from the map and the target resolution."""
    _targets = [(ProtGmmhetBuildGmm, ['numberOfGaussians'])]

    def show(self, form, *args):
        try:
            n = suggestedNumberOfGaussians(form.protocol)
        except Exception as exc:  # shown in the form, never a traceback
            form.showWarning(str(exc))
            return
        form.setVar('numberOfGaussians', n)
