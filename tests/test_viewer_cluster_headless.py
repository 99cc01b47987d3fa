"""Headless functions of the cluster viewer (:mod:`scipion_gmmhet.viewers.viewer_cluster`):
the PC-trajectory ChimeraX file and the Gaussian displacements between two classes, on a
small stand-in for the protocol (the few methods the functions call) and a stand-in model."""
from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from scipion_gmmhet.engine.model.gmm import GMM
from scipion_gmmhet.engine.io.mrc import read_map, write_map

vc = pytest.importorskip("scipion_gmmhet.viewers.viewer_cluster")

BOX, APIX, N_GAUSS = 32, 2.0, 6
MOVED = [1, 4]          # Gaussians that move between class 1 and class 2 centres


class FakeModel:
    """gmm_at(z): Gaussians 1 and 4 shift along x by 3*z[0] A and along z by -2*z[1] A."""

    def __init__(self):
        rng = np.random.default_rng(3)
        self.centers = rng.uniform(-12, 12, (N_GAUSS, 3))
        self.calls = []

    def gmm_at(self, z):
        z = np.asarray(z, np.float64).reshape(-1)
        self.calls.append(z.copy())
        c = self.centers.copy()
        c[MOVED, 0] += 3.0 * z[0]
        c[MOVED, 2] -= 2.0 * z[1]
        return GMM(c, np.ones(N_GAUSS), np.full(N_GAUSS, 2.5), BOX, APIX)


class FakeProt:
    def __init__(self, root):
        self.root = str(root)
        self.analysis = os.path.join(self.root, 'analysis')
        os.makedirs(self.analysis)
        maps = []
        for s in range(5):
            name = 'pc1_%02d.mrc' % s
            write_map(os.path.join(self.analysis, name), np.full((BOX,) * 3, s, np.float32), APIX)
            maps.append(name)
        self.summary = {
            'clusters': [{'label': 0, 'size': 10, 'fraction': 0.5, 'center': [0.0, 0.0],
                          'nearest_row': 0},
                         {'label': 1, 'size': 10, 'fraction': 0.5, 'center': [2.0, 1.5],
                          'nearest_row': 1}],
            'trajectories': {'pc1': {'maps': maps, 'pc_coordinates': [-2, -1, 0, 1, 2]}}}
        with open(os.path.join(self.analysis, 'summary.json'), 'w') as f:
            json.dump(self.summary, f)

    def getSummary(self, missingOk=False):
        with open(os.path.join(self.analysis, 'summary.json')) as f:
            return json.load(f)

    def getAnalysisDir(self):
        return self.analysis

    def getTrainDir(self):
        return os.path.join(self.root, 'train')


@pytest.fixture
def prot(tmp_path):
    return FakeProt(tmp_path / 'prot')


def test_trajectory_cxc_lists_maps_in_step_order(prot, tmp_path):
    cxc = vc.writeTrajectoryChimerax(prot, 1, str(tmp_path / 'out'))
    assert os.path.exists(cxc) and cxc.endswith('.cxc')
    text = open(cxc).read()
    opens = [l for l in text.splitlines() if l.startswith('open ')]
    assert len(opens) == 1 and 'vseries true' in opens[0]
    paths = re.findall(r'"([^"]+)"', opens[0])
    assert [os.path.basename(p) for p in paths] == ['pc1_%02d.mrc' % s for s in range(5)]
    assert all(os.path.isabs(p) and os.path.exists(p) for p in paths)
    assert 'vseries play #1' in text
    # step order of the maps on disk: the map of step s is filled with s
    assert [float(read_map(p)[0].mean()) for p in paths] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_trajectory_missing_pc(prot, tmp_path):
    with pytest.raises(ValueError, match='PC2'):
        vc.writeTrajectoryChimerax(prot, 2, str(tmp_path / 'out'))


def test_displacement_files(prot, tmp_path):
    model = FakeModel()
    out = vc.writeDisplacementFiles(prot, 1, 2, str(tmp_path / 'disp'), model=model)
    assert set(out) == {'map_a', 'map_b', 'bild', 'cmm', 'png', 'cxc'}
    assert all(os.path.exists(p) and os.path.getsize(p) > 0 for p in out.values())
    # decoded at the two class centres from summary.json
    assert np.allclose(model.calls[0], [0.0, 0.0]) and np.allclose(model.calls[1], [2.0, 1.5])
    # one arrow per moved Gaussian, from its class-1 position by its displacement (+6, 0, -3)
    arrows = np.array([[float(v) for v in l.split()[1:7]]
                       for l in open(out['bild']) if l.startswith('.arrow')])
    assert len(arrows) == len(MOVED)
    start = model.centers[MOVED] + (BOX // 2) * APIX
    assert np.allclose(arrows[:, :3], start, atol=1e-3)
    assert np.allclose(arrows[:, 3:] - arrows[:, :3], [[6.0, 0.0, -3.0]] * len(MOVED), atol=1e-3)
    # markers at every Gaussian of class 1
    assert len(ET.parse(out['cmm']).getroot().findall('marker')) == N_GAUSS
    # the ChimeraX file opens both GMM maps, then the arrows and markers
    opened = re.findall(r'^open "([^"]+)"', open(out['cxc']).read(), re.M)
    assert opened == [out['map_a'], out['map_b'], out['bild'], out['cmm']]
    va, vb = read_map(out['map_a'])[0], read_map(out['map_b'])[0]
    assert va.shape == (BOX,) * 3 and not np.allclose(va, vb)
    # quiver PNG is not blank
    import matplotlib.image
    img = matplotlib.image.imread(out['png'])
    assert img.ndim == 3 and img[..., :3].std() > 0.01


def test_displacement_bad_classes(prot, tmp_path):
    with pytest.raises(ValueError, match='class 3'):
        vc.writeDisplacementFiles(prot, 1, 3, str(tmp_path / 'd'), model=FakeModel())
    with pytest.raises(ValueError, match='two different'):
        vc.writeDisplacementFiles(prot, 2, 2, str(tmp_path / 'd'), model=FakeModel())


def test_displacement_loads_the_trained_model(prot, tmp_path, monkeypatch):
    import scipion_gmmhet.engine.training.trained as train
    seen = []

    def fake_load(train_dir, device='cpu'):
        seen.append(train_dir)
        return FakeModel()
    monkeypatch.setattr(train, 'load_trained', fake_load)
    out = vc.writeDisplacementFiles(prot, 2, 1, str(tmp_path / 'd'))
    assert seen == [prot.getTrainDir()]
    arrows = [l for l in open(out['bild']) if l.startswith('.arrow')]
    assert len(arrows) == len(MOVED)


def test_report_includes_trajectories(prot, tmp_path):
    labels = np.array([0] * 10 + [1] * 10)
    np.save(os.path.join(prot.analysis, 'labels.npy'), labels)
    emb = np.random.default_rng(0).normal(size=(20, 2)) + labels[:, None] * 3
    prot.getEmbedding = lambda name='pca': emb if name == 'pca' else None
    files = vc.writeClusterReport(prot, str(tmp_path / 'report'))
    assert 'trajectory_pc1' in files and os.path.exists(files['trajectory_pc1'])
    assert os.path.getsize(files['embedding_pca']) > 0 and 'fsc' not in files
