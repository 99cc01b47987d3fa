"""The form wizard that fills in the number of Gaussians (driven with stand-in form objects)."""
import numpy as np
import pytest

from scipion_gmmhet.engine.model.build import choose_n_gaussians
from scipion_gmmhet.engine.model.gmm import render_map
from scipion_gmmhet.engine.io.mrc import write_map

wizards = pytest.importorskip("scipion_gmmhet.wizards")


class _Value:
    def __init__(self, v):
        self.v = v

    def get(self):
        return self.v


class _Volume:
    def __init__(self, fn, apix):
        self.fn, self.apix = fn, apix

    def getFileName(self):
        return self.fn + ':mrc'

    def getSamplingRate(self):
        return self.apix


class _Protocol:
    def __init__(self, volume, resolution):
        self.inputVolume, self.inputMask, self.resolution = _Value(volume), _Value(None), _Value(resolution)


class _Form:
    def __init__(self, protocol):
        self.protocol, self.vars, self.warnings = protocol, {}, []

    def setVar(self, name, value):
        self.vars[name] = value

    def showWarning(self, msg):
        self.warnings.append(msg)


def _map(tmp_path):
    import torch
    rng = np.random.default_rng(0)
    centers = torch.tensor(rng.normal(0, 12, (300, 3)), dtype=torch.float32)
    vol = render_map(centers, torch.ones(300), torch.full((300,), 3.0), 48, 2.0).numpy()
    fn = str(tmp_path / "map.mrc")
    write_map(fn, vol, 2.0)
    return fn, vol


def test_wizard_fills_the_engine_choice(tmp_path):
    fn, vol = _map(tmp_path)
    form = _Form(_Protocol(_Volume(fn, 2.0), 8.0))
    wizards.GmmhetNumberOfGaussiansWizard().show(form)
    assert form.warnings == []
    assert form.vars["numberOfGaussians"] == choose_n_gaussians(vol, 2.0, 8.0)
    # a finer target needs more Gaussians
    form12 = _Form(_Protocol(_Volume(fn, 2.0), 12.0))
    wizards.GmmhetNumberOfGaussiansWizard().show(form12)
    assert form12.vars["numberOfGaussians"] < form.vars["numberOfGaussians"]


def test_wizard_warns_without_input(tmp_path):
    form = _Form(_Protocol(None, 8.0))
    wizards.GmmhetNumberOfGaussiansWizard().show(form)
    assert form.vars == {} and "input map" in form.warnings[0]
