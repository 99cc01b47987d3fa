"""ChimeraX for the gmmhet viewers: :func:`chimeraxViews` opens a command file in ChimeraX
where it is installed. The files themselves (``.cxc`` command files, ``.cmm`` markers, ``.bild``
arrows, and the frame they share) are written by :mod:`scipion_gmmhet.engine.io.chimerax`,
re-exported here for the viewers.

Nothing here imports pyworkflow or pwem at module level (plain-pytest testable).
"""
from __future__ import annotations

import logging
import os
import shutil

from scipion_gmmhet.engine.io.chimerax import (centers_to_chimerax_A, displacement_bild,  # noqa: F401
                                               gmm_markers_cmm, maps_cxc, markers_cmm, volume_series_cxc,
                                               write_cxc)

__all__ = ["centers_to_chimerax_A", "write_cxc", "maps_cxc", "volume_series_cxc",
           "markers_cmm", "gmm_markers_cmm", "displacement_bild", "chimerax_program",
           "chimeraxViews"]

log = logging.getLogger(__name__)


def chimerax_program() -> str | None:
    """Path of the ChimeraX binary: scipion-em-chimera's configured one, else ``chimerax`` /
    ``ChimeraX`` on the PATH; None where it is not installed."""
    try:
        from pwem.viewers.viewer_chimera import Chimera
        program = Chimera.getProgram()
        if program and os.path.exists(program):
            return program
    except Exception as exc:  # noqa: BLE001 - no scipion-em-chimera, or not configured: try the PATH
        log.info("ChimeraX through scipion-em-chimera unavailable (%s: %s); looking on the PATH",
                 type(exc).__name__, exc)
    for name in ("chimerax", "ChimeraX"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chimeraxViews(cxc: str, viewer=None, what: str = "the maps") -> list:
    """Views for a pyworkflow viewer: ChimeraX on ``cxc`` where it is installed (pwem's
    ``ChimeraView`` for scipion-em-chimera's ChimeraX, a ``CommandView`` for one on the PATH),
    else an information message with the command to run (``viewer``'s ``infoMessage``, or a
    plain string without a viewer)."""
    program = chimerax_program()
    if program:
        try:
            from pwem.viewers.viewer_chimera import Chimera, ChimeraView
            if os.path.abspath(program) == os.path.abspath(Chimera.getProgram() or ""):
                return [ChimeraView(cxc)]
        except Exception as exc:  # noqa: BLE001 - pwem's ChimeraView unusable: run the binary directly
            log.info("pwem's ChimeraView unavailable (%s: %s); running %s directly", type(exc).__name__, exc,
                     program)
        import shlex
        from pyworkflow.viewer import CommandView
        return [CommandView("%s %s &" % (shlex.quote(program), shlex.quote(cxc)))]
    msg = ("ChimeraX is not installed (scipion-em-chimera). Open %s with:\n  chimerax %s"
           % (what, cxc))
    if viewer is not None:
        return [viewer.infoMessage(msg, title="ChimeraX")]
    return [msg]
