"""What every gmmhet protocol viewer shares: where its figures go (:meth:`_pngPath`), the
"not finished yet" message (:meth:`_ready`), the half-map FSC plot (:meth:`_showFsc`) and the
maps in ChimeraX (:meth:`_showMaps`). A viewer sets the class attributes and overrides
:meth:`_isReady` and, for FSC and maps, :meth:`_fscCurves` and :meth:`_writeMapsScript`."""
from __future__ import annotations

import os

import pyworkflow.viewer as pwviewer
from pwem.viewers import EmProtocolViewer
from pwem.viewers.plotter import EmPlotter

from ..protocols.labels import GmmhetLabel
from . import chimerax as cx, plots


class GmmhetViewer(GmmhetLabel, EmProtocolViewer):
    """Base of the gmmhet protocol viewers (not offered itself: no targets); titled
    "gmmhet - viewer ..."."""
    _targets = []
    _environments = [pwviewer.DESKTOP_TKINTER, pwviewer.WEB_DJANGO]
    #: file-name prefix of the figures, e.g. 'cluster' -> gmmhet_cluster_<protocol id>_<name>
    _fileTag = 'viewer'
    #: (message, title) while the protocol has no results
    _notReady = ('The protocol has not finished yet.', 'No results')
    _fscTitle = 'Half-map FSC'
    _fscMissing = 'The protocol ran without reconstructions.'
    _mapsWhat = 'the maps'

    def _isReady(self) -> bool:
        return True

    def _pngPath(self, name: str) -> str:
        """Absolute path of a figure or command file of this viewer (in the project's Tmp)."""
        folder = os.path.abspath(self._getPath())
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, 'gmmhet_%s_%s_%s' % (self._fileTag, self.protocol.getObjId(), name))

    def _ready(self):
        """None when there are results to show, else the viewer's error message (a list)."""
        if self._isReady():
            return None
        msg, title = self._notReady
        return [self.errorMessage(msg, title=title)]

    # -- half-map FSC
    def _fscCurves(self):
        """(frequency 1/A, {curve name: FSC}) of the protocol's reconstructions."""
        raise NotImplementedError

    def _showFsc(self, paramName=None):
        err = self._ready()
        if err:
            return err
        freq, curves = self._fscCurves()
        if not curves:
            return [self.errorMessage(self._fscMissing, title='FSC')]
        plotter = EmPlotter(x=1, y=1, figsize=(7, 4.5), windowTitle='Half-map FSC')
        plots.draw_fsc(plotter.createSubPlot('', '', ''), freq, curves, title=self._fscTitle)
        plotter.savefig(self._pngPath('fsc.png'))
        return [plotter]

    # -- maps in ChimeraX
    def _writeMapsScript(self, outCxc: str) -> str:
        raise NotImplementedError

    def _showMaps(self, paramName=None):
        err = self._ready()
        if err:
            return err
        cxc = self._writeMapsScript(self._pngPath('maps.cxc'))
        return cx.chimeraxViews(os.path.abspath(cxc), self, what=self._mapsWhat)
