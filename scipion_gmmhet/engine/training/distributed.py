"""Several training processes (GPUs, nodes) through ``torch.distributed``, launched by ``torchrun``.

``gmmhet train`` needs no option for it: started by ``torchrun`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), each process joins the
group (backend ``nccl`` on CUDA, ``gloo`` on CPU) and uses GPU ``cuda:LOCAL_RANK``::

    torchrun --nproc_per_node 4 -m scipion_gmmhet.engine train --particles p.star --gmm build/ --out t/
    # two nodes with 4 GPUs each (run on both; the output folder must be on a shared file system)
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 \\
        -m scipion_gmmhet.engine train ...

How training is split (see :func:`train.train`): every process draws the same seeded
permutation of each epoch and the same global batches as one process would; process ``r``
takes positions ``r, r + W, ...`` of each global batch, and each process's loss is its sum
over its share divided by the global batch size and multiplied by ``W``, so DDP's gradient
average is exactly the mean over the global batch: the same optimisation as one process with
the full batch, up to the order of floating-point sums. Rank 0 alone writes checkpoints and
outputs; the latents are gathered in star order.

Without ``WORLD_SIZE > 1`` :func:`init_from_env` returns a :class:`Dist` of one process whose
collectives do nothing.
"""
from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError

log = logging.getLogger(__name__)


@dataclass
class Dist:
    """The process group as the training loop sees it: ``rank``, ``world_size``, ``local_rank``,
    the ``device`` of this process, and the few collectives it needs."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the processes (in place and returned)."""
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def raise_if_any(self, err: Exception | None) -> None:
        """Collective: every process raises (the same message) when any process has ``err``."""
        if not self.enabled:
            if err is not None:
                raise err
            return
        flag = torch.tensor([0.0 if err is None else 1.0], device=self._coll_device())
        self.all_reduce_sum(flag)
        if err is not None:
            raise err
        if float(flag) > 0:
            raise InputError("another training process stopped with an error (see rank 0's log)")

    def _coll_device(self) -> torch.device:
        if self.enabled and torch.distributed.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")

    def gather_rows(self, local: np.ndarray, n_total: int) -> np.ndarray:
        """Concatenate each rank's contiguous block of rows (rank order = star order): rank ``r``
        holds rows ``[n r / W, n (r+1) / W)`` (:meth:`block`). Every rank gets the whole array."""
        if not self.enabled:
            return local
        dev = self._coll_device()
        width = local.shape[1]
        size = max(self.block(n_total, r)[1] - self.block(n_total, r)[0] for r in range(self.world_size))
        buf = torch.zeros((size, width), dtype=torch.float32, device=dev)
        buf[:len(local)] = torch.as_tensor(local, dtype=torch.float32, device=dev)
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, buf)
        out = []
        for r, p in enumerate(parts):
            lo, hi = self.block(n_total, r)
            out.append(p[:hi - lo].cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def block(self, n: int, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        return n * r // self.world_size, n * (r + 1) // self.world_size

    def shard(self, n: int) -> np.ndarray:
        """Positions ``rank, rank + W, ...`` of a global batch of ``n``."""
        return np.arange(self.rank, n, self.world_size)

    def close(self) -> None:
        if self.initialized_here and torch.distributed.is_initialized():
            # objects bound to the group (DistributedDataParallel and its reducer) that sit in
            # reference cycles are freed now, while the group exists: freed by a later garbage
            # collection or at exit they tear down gloo state that is gone, and the process aborts
            # ("terminate called without an active exception", ~1 in 30 two-process CPU runs here)
            gc.collect()
            torch.distributed.destroy_process_group()
            self.initialized_here = False


def single(device: torch.device | None = None) -> Dist:
    return Dist(device=device)


def init_from_env(device: str | None = None) -> Dist:
    """Join the process group described by torchrun's environment variables (``WORLD_SIZE > 1``),
    or return a one-process :class:`Dist`. ``device``: ``cpu``/``cuda``/``auto`` as for
    ``--device``; with CUDA each process takes ``cuda:LOCAL_RANK`` (of the GPUs in
    ``CUDA_VISIBLE_DEVICES``)."""
    from ..device import resolve_device
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist(device=resolve_device(device))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        n_gpu = torch.cuda.device_count()
        if local_rank >= n_gpu:
            raise InputError(f"torchrun: process {local_rank} on this node but only {n_gpu} GPU(s) visible; "
                             "give --nproc_per_node at most the number of GPUs (or set CUDA_VISIBLE_DEVICES)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    initialized_here = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
        initialized_here = True
    if rank != 0:  # one log: the other ranks only say what goes wrong
        logging.getLogger("scipion_gmmhet").setLevel(logging.WARNING)
    log.info("process group: %d processes (backend %s), this is rank %d on %s", world, backend, rank, dev)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=initialized_here)
