"""Multi-GPU set-up shared by the three bundles' ``configs/multi_gpu_train.json`` (and evaluation).

MONAI's bundles spell the DDP start as three config expressions (init the process group, pick the
GPU, seed); this collection had five copies of them, one of which forgot the per-rank seed. Here
:func:`start` does all of it in one place and :func:`finish` ends it; the configs' ``initialize`` and
``finalize`` lists call them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from custom.engines.checkpoint_files import BestModelSaver
from custom.utils import require_bool, seed_everything

__all__ = ["start", "finish", "rank_handlers"]


def start(seed: int | None, cudnn_benchmark: bool = False) -> int:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs), use this rank's GPU, seed this rank.

    The GPU is ``cuda:$LOCAL_RANK``, the one torchrun gives this process (the configs' ``device`` reads the
    same variable).

    The seed is ``seed + rank`` (:func:`custom.utils.seed_everything`), so ranks draw different crops.
    Returns the rank.

    Raises:
        TypeError: ``cudnn_benchmark`` is not True or False (``--cudnn_benchmark false`` is a string).
    """
    require_bool(cudnn_benchmark, "cudnn_benchmark")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    seed_everything(seed)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    return dist.get_rank()


def finish() -> None:
    """Wait for every rank, then leave the process group (nothing when none was joined)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_handlers(handlers: Sequence[Any] | None, rank: int | None = None) -> list | None:
    """``handlers`` for this DDP rank, selected by what each handler is, not by its place in the list.

    Rank 0 keeps them all. The other ranks keep the handlers every rank must run (loss check, LR
    schedule, validation, checkpoint signals, model loading, the evaluation report, which gathers
    across ranks) and drop those that only log or write files: ``StatsHandler``,
    ``TensorBoardStatsHandler``, ignite's ``ProgressBar`` and the best-model saver (rank 0 writes
    ``model.pt``). A handler appended by a user is kept on every rank unless it is one of those.
    Returns None for an empty selection (what MONAI's engines take for "no handlers").
    """
    from ignite.handlers import ProgressBar
    from monai.handlers import StatsHandler, TensorBoardStatsHandler

    if handlers is None:
        return None
    rank = _rank() if rank is None else rank
    if rank == 0:
        return list(handlers)
    kept = [
        h for h in handlers if not isinstance(h, (StatsHandler, TensorBoardStatsHandler, ProgressBar, BestModelSaver))
    ]
    return kept or None
