"""One GPU convention for the gmmhet forms: "Use GPU?" defaults to Yes only where a CUDA GPU is
visible, and validation says in the form's own words what to do when none is."""
from __future__ import annotations

import functools
import glob
import os


@functools.lru_cache(maxsize=1)
def cudaAvailable() -> bool:
    """Whether this machine has a usable CUDA GPU. A machine without the NVIDIA driver is
    answered without importing torch (fast, for form defaults); otherwise torch decides."""
    if not (os.path.exists('/proc/driver/nvidia/version') or glob.glob('/dev/nvidia[0-9]*')):
        return False
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # torch missing is reported by the plugin's own checks
        return False


def gpuListError(prot) -> str | None:
    """The form's one-line error for a GPU IDs field that is not integers (e.g. 'cuda:0', '-1',
    'abc'), where pyworkflow's ``getGpuList()`` raises ValueError; ``None`` when it parses."""
    try:
        prot.getGpuList()
    except (ValueError, TypeError):
        raw = prot.gpuList.get() if hasattr(prot, 'gpuList') else None
        msg = ("GPU IDs: give integers separated by commas or spaces, e.g. 0 or 0,1 (got %r)"
               % raw)
        if isinstance(raw, str) and raw.strip().startswith('-'):
            msg += '; to run on the CPU set "Use GPU?" to No'
        return msg + '.'
    return None


def protocolGpus(prot, first: bool = False) -> list[int]:
    """The GPU ids a run uses: ``[]`` when "Use GPU?" is No, the first id only with ``first``.
    A GPU IDs field that does not parse (a run launched without the form's validation, e.g. from
    a script) stops the run with the form's one-line message, not pyworkflow's ValueError."""
    if not prot.usesGpu():
        return []
    listError = gpuListError(prot)
    if listError:
        raise ValueError(listError)
    gpus = list(prot.getGpuList())
    return gpus[:1] if first else gpus


def gpuErrors(prot, emptyError: str | None = None) -> list[str]:
    """The form's GPU errors, if any: GPU IDs that are not integers (one line, instead of
    pyworkflow's traceback), an empty GPU IDs field (``emptyError``, when given), and "Use GPU?
    = Yes" on a machine without CUDA (a run sent to a queue is checked on its node, not here).
    Call this before anything else in ``_validate`` uses ``getGpuList()``."""
    if not prot.usesGpu():
        return []
    errors = []
    listError = gpuListError(prot)
    if listError:
        errors.append(listError)
    elif emptyError and not prot.getGpuList():
        errors.append(emptyError)
    useQueue = getattr(prot, '_useQueue', None)
    if callable(useQueue) and useQueue():
        return errors
    if cudaAvailable():
        return errors
    return errors + ['Use GPU: no CUDA GPU is visible on this machine; set "Use GPU?" to No to '
                     'run on the CPU.']
