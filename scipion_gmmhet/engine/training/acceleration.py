"""Acceleration of the training step: mixed precision (``--amp``) and ``torch.compile`` (``--compile``).

GPU path (all optional; the defaults give the float32 results above):

- ``amp`` (``--amp off|bf16|fp16``, default off): the encoder and decoder MLPs (the model's
  forward) run under ``torch.autocast`` in bfloat16 or float16; their outputs are cast to
  float32 before the GMM projection, and the projection, the FRC (:class:`fourier.RingBinner`)
  and the loss stay in float32, so the FRC's ring sums keep their accuracy. The validation loss
  uses the same precision; ``latent.npy`` is encoded in float32. fp16 uses a
  ``torch.amp.GradScaler`` (loss scaling; a step whose gradients overflow is skipped) and is
  refused on the CPU; bf16 needs no scaling (float32's exponent range) and runs on both.
- ``compile`` (``--compile``): the encoder's and decoder's MLPs go through ``torch.compile``,
  tried once on a dummy batch (forward and backward) before training; a failure (no C
  compiler, no Triton, an unsupported torch) is a logged warning and training runs eagerly.
  Checkpoints and ``model.pt`` hold the plain modules' parameters (no ``_orig_mod.`` names).
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ..errors import InputError
from ..model.networks import HetModel

log = logging.getLogger(__name__)

AMP_MODES = ("off", "bf16", "fp16")


class Amp:
    """Mixed precision of the model's forward (``--amp``, see the module docstring): an autocast
    context for the MLPs, and loss scaling (``torch.amp.GradScaler``) for fp16."""

    def __init__(self, mode: str, device: torch.device):
        mode = str(mode or "off").lower()
        if mode not in AMP_MODES:
            raise InputError(f"--amp {mode!r}: give one of {', '.join(AMP_MODES)}")
        device = torch.device(device)
        if mode == "fp16" and device.type != "cuda":
            raise InputError(f"--amp fp16: float16 training needs a CUDA device (the device is {device}); "
                             "use --amp bf16 or --amp off")
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16 or --amp off")
        self.mode, self.device_type = mode, device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = _grad_scaler() if mode == "fp16" else None
        self.projection = "fp32"  # precision of the projection's matrix product (TrainConfig.proj_precision)

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        """Context for the model's forward: autocast to ``dtype``, or nothing when off."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def install(self, model: HetModel) -> None:
        """Make the encoder's and decoder's MLPs return float32 (a forward hook), so that the
        latents, the decoder's ``f(z) - f(0)`` and the GMM parameters built from them are float32
        under autocast. No effect on float32 outputs; parameters and state_dict unchanged."""
        if self.enabled:
            for net in (model.encoder.net, model.decoder.net):
                net.register_forward_hook(_float32_output)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, opt: torch.optim.Optimizer) -> None:
        """Adam step; with loss scaling the gradients are unscaled first and a step whose
        gradients hold Inf/NaN is skipped (the scale is then lowered)."""
        if self.scaler is None:
            opt.step()
            return
        self.scaler.step(opt)
        self.scaler.update()


def _grad_scaler():
    try:
        return torch.amp.GradScaler("cuda")
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler()


def _float32_output(module, inputs, output):
    return output.float()


def autocast(amp: Amp | None):
    return amp.autocast() if amp is not None else contextlib.nullcontext()


def compile_mlps(model: HetModel, n_features: int, device: torch.device, amp: Amp | None) -> bool:
    """``torch.compile`` the encoder's and decoder's MLPs in place (their ``forward``; module
    names and state_dict unchanged) and try them once, forward and backward, on a dummy batch of
    2; on failure restore the eager modules and log a warning. The trial leaves the parameters,
    buffers, gradients and random number generators as they were. Returns True when compiled."""
    nets = (model.encoder.net, model.decoder.net)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        for net in nets:
            net.forward = torch.compile(net.forward, **_compile_options())
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            x = torch.ones((2, n_features), device=device)
            with autocast(amp):
                z, (c, a, s) = model(x)
            (z.float().sum() + c.float().sum() + a.float().sum() + s.float().sum()).backward()
        ok = True
    except Exception as exc:  # noqa: BLE001 - any compiler failure: train eagerly
        for net in nets:
            net.__dict__.pop("forward", None)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        log.warning("--compile: torch.compile failed (%s: %s); training without it", type(exc).__name__, first)
        ok = False
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
    if ok:
        log.info("--compile: encoder and decoder MLPs compiled with torch.compile")
    return ok


def _compile_options() -> dict:
    """Each compiled MLP keeps its own graphs (train/eval, grad/no-grad, the decoder's zero row,
    static then dynamic batch: ~6 each; both MLPs share one code object, whose default limit of
    8 graphs would send the later ones back to eager mode)."""
    import inspect
    params = inspect.signature(torch.compile).parameters
    if "isolate_recompiles" in params and "recompile_limit" in params:
        return {"isolate_recompiles": True, "recompile_limit": 32}
    cfg = torch._dynamo.config  # older torch: one process-wide limit
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(int(getattr(cfg, name, 8)), 32))
    return {}
