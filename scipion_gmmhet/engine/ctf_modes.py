"""How particle images carry the CTF: the one vocabulary of every command (no torch).

``full``: raw images, multiplied by the CTF (RELION's :func:`conventions.ctf_2d`);
``phase_flipped``: multiplied by ``|CTF|``; ``premultiplied``: multiplied by ``CTF^2``
(``rlnCtfDataAreCtfPremultiplied``); ``none``: no CTF (or ignore it). ``auto`` (the commands'
default) reads it from the star file. Used by ``gmmhet train --ctf``, ``gmmhet refine --ctf``
and ``gmmhet reconstruct --ctf-mode``; the version 0.1 spellings ``ctf`` and ``flipped`` are
accepted with a one-line deprecation note.
"""
from __future__ import annotations

import logging

from .errors import InputError

log = logging.getLogger(__name__)

CTF_MODES = ("full", "phase_flipped", "premultiplied", "none")
#: version 0.1 spellings (``gmmhet train --ctf ctf|flipped``), still accepted
CTF_MODE_ALIASES = {"ctf": "full", "flipped": "phase_flipped"}
#: what the command-line options accept
CTF_CHOICES = ("auto",) + CTF_MODES + tuple(CTF_MODE_ALIASES)


def ctf_mode(mode: str | None, what: str = "--ctf", quiet: bool = False) -> str:
    """One of :data:`CTF_MODES` or ``'auto'`` (also for None): ``mode`` with the version 0.1
    spellings translated (a deprecation line in the log unless ``quiet``); InputError naming
    ``what`` for anything else."""
    if mode is None:
        return "auto"
    name = str(mode).strip().lower()
    if name in CTF_MODE_ALIASES:
        if not quiet:
            log.warning("%s %s is deprecated: write %s", what, name, CTF_MODE_ALIASES[name])
        name = CTF_MODE_ALIASES[name]
    if name != "auto" and name not in CTF_MODES:
        raise InputError(f"{what} {mode!r}: give one of {', '.join(CTF_CHOICES[:len(CTF_MODES) + 1])}")
    return name
