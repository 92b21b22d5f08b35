"""Stopping training on a preemption signal: note SIGTERM/SIGUSR1, agree across DDP ranks, exit with status 75.

SLURM and Kubernetes send SIGTERM (or, with SLURM's ``--signal``, SIGUSR1) before they kill a job. The
handler installed here only notes the signal; ``custom.engines.training_checkpoint.TrainingCheckpoint``
asks :meth:`PreemptionSignals.stop_agreed` after each iteration, writes its checkpoint, then calls
:meth:`PreemptionSignals.stop`, which raises :class:`TrainingPreempted`: the bundle command exits with
:data:`PREEMPTED_EXIT_CODE` and the same command resumes.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from custom.utils import is_main_process

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["PREEMPTED_EXIT_CODE", "TrainingPreempted", "PreemptionSignals"]

logger = logging.getLogger(__name__)

#: exit status of a run stopped by SIGTERM/SIGUSR1 after saving its checkpoint: sysexits.h EX_TEMPFAIL
#: ("temporary failure, try again"), distinct from a crash (1), a plain kill (-15 / 143) and a finished run (0)
PREEMPTED_EXIT_CODE = 75


class TrainingPreempted(SystemExit):
    """Training stopped on a signal after writing its checkpoint; the process exits with :data:`PREEMPTED_EXIT_CODE`.

    A ``SystemExit`` so that the bundle command ends with that status and without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PreemptionSignals:
    """The stop signals of one training run: noted while it runs, agreed on across DDP ranks, then a clean stop.

    Args:
        signals: names of the signals that stop training after a save (those this platform lacks are skipped).
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1")) -> None:
        self.signals = tuple(getattr(signal, s) for s in signals if hasattr(signal, s))
        self.received: int | None = None
        self.received_at: int | None = None
        self._engine: Engine | None = None
        self._handlers: dict[int, Any] = {}

    def install(self, engine: Engine) -> None:
        """Note the signals from now on (the default action stays outside the main thread, where Python cannot)."""
        self._engine = engine
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only; the default action stays
        for sig in self.signals:
            self._handlers[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, previous in self._handlers.items():
            signal.signal(sig, previous)
        self._handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Only note it (the training loop stops at the end of the iteration); a save in progress goes on."""
        if self.received is None:
            self.received = signum
            self.received_at = self._engine.state.iteration if self._engine is not None else None

    def stop_agreed(self) -> bool:
        """Whether any rank was signalled: one all-reduce (MAX) of a flag, so every rank stops at this iteration."""
        local = self.received is not None
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([int(local)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, engine: Engine, saved: Path) -> None:
        """After the checkpoint ``saved`` is written: wait for every rank, log and raise :class:`TrainingPreempted`.

        Raises:
            TrainingPreempted: always.
        """
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank exits (and makes torchrun kill the others) before rank 0 has written
        self.restore()
        name = signal.Signals(self.received).name if self.received is not None else "a stop signal on another rank"
        during = f" (received at iteration {self.received_at})" if self.received_at else ""
        message = (
            f"{name}{during}: stopped after iteration {engine.state.iteration} (epoch {engine.state.epoch}) and "
            f"saved {saved}; exit status {PREEMPTED_EXIT_CODE}. Run the same command to resume there."
        )
        if is_main_process():
            logger.warning(message)
        raise TrainingPreempted(message)
