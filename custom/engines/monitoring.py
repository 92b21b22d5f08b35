"""Stop a training run loudly when its loss stops being a number.

ignite's ``TerminateOnNan`` ends the run with exit status 0; this raises instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ignite.engine import Engine


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss:
    """Stop training with a clear error the first time the loss is NaN or infinite.

    ignite's ``TerminateOnNan`` ends the run quietly (a warning, exit status 0); a multi-day run then
    looks finished. This raises instead, so the command exits non-zero; the last checkpoint (of the last
    completed epoch, or of the last ``checkpoint_interval`` save) is left as it was, and resuming from
    it with a lower ``learning_rate`` is the usual fix: :class:`TrainingCheckpoint` applies a changed
    learning rate on resume. Attach it before the checkpoint handler, so that an iteration with a
    non-finite loss is never saved.

    Args:
        ckpt_dir: named in the message (where the last good checkpoint is).
        loss_key: key of the loss in the iteration output.
    """

    def __init__(self, ckpt_dir: str = "", loss_key: str = "loss") -> None:
        self.ckpt_dir = ckpt_dir
        self.loss_key = loss_key

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        for item in items:
            loss = item.get(self.loss_key) if isinstance(item, Mapping) else None
            if loss is not None and not torch.isfinite(torch.as_tensor(loss)).all():
                raise NonFiniteLossError(
                    f"training loss is {float(torch.as_tensor(loss).float().mean())} at epoch {engine.state.epoch}, "
                    f"iteration {engine.state.iteration}: stopped. The last checkpoint in {self.ckpt_dir or 'ckpt_dir'} "
                    "(of the last completed epoch, or of the last checkpoint_interval save) is kept; resume from it "
                    "with the same command and a lower --learning_rate (a resume applies it), or check the data "
                    "with the check_data command."
                )
