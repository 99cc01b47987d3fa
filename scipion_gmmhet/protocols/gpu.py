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


def gpuErrors(prot) -> list[str]:
    """The form's GPU error, if any: "Use GPU? = Yes" on a machine without CUDA (a run sent to
    a queue is checked on its node, not here)."""
    if not prot.usesGpu():
        return []
    useQueue = getattr(prot, '_useQueue', None)
    if callable(useQueue) and useQueue():
        return []
    if cudaAvailable():
        return []
    return ['Use GPU: no CUDA GPU is visible on this machine; set "Use GPU?" to No to run on '
            'the CPU.']
