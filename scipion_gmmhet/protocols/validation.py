"""The protocols' side of the engine's shared input checks (``engine.io.validate``): the same
functions, so the GUI refuses what ``gmmhet`` refuses with the same text after the input's name
(the form field here, the file or option there). No torch is imported (``_validate`` runs in
the GUI)."""
from __future__ import annotations

from ..engine.errors import InputError
from ..engine.io import validate

#: Values of the "CTF" choice of the protocols that train, in form order.
CTF_CHOICES = ['auto', 'none']
CTF_LABELS = ["Use the particles' CTF", 'None (phase-flipped or CTF-free images)']


def ctfErrors(name: str, hasCtf: bool, ctfMode: str) -> list[str]:
    """[] or the refusal of particles without CTF when the user did not choose CTF none."""
    try:
        validate.resolve_ctf_mode(bool(hasCtf), ctfMode, name)
    except InputError as exc:
        return [str(exc)]
    return []


def maskGridErrors(name: str, mask, modelGrid: tuple[int, float] | None, modelName: str) -> list[str]:
    """[] or the refusal of a Scipion mask (Volume) on another box or pixel size than
    ``modelGrid`` ``(box, apix)`` (nothing to compare: [])."""
    dims = mask.getDim() if mask is not None else None
    if dims is None or modelGrid is None:
        return []
    box, apix = modelGrid
    msg = validate.mask_grid_message(name, tuple(int(d) for d in dims)[::-1], mask.getSamplingRate() or None,
                                     (int(box),) * 3, float(apix), modelName)
    return [msg] if msg else []


def volumeGrid(vol) -> tuple[int, float] | None:
    """``(box, apix)`` of a Scipion volume, None when unknown."""
    dims = vol.getDim() if vol is not None else None
    if not dims or not vol.getSamplingRate():
        return None
    return int(dims[0]), float(vol.getSamplingRate())
