"""The handler that keeps a training run resumable: checkpoints, preemption, resume, in one ignite handler.

:class:`TrainingCheckpoint` composes the three jobs, each in its own module: the files
(``custom.engines.checkpoint_files``: atomic saves, two generations, nothing of the user's overwritten),
the stop signals (``custom.engines.preemption``: SIGTERM/SIGUSR1, agreed across DDP ranks, exit status 75)
and the resume (``custom.engines.resume``: the recipe check, each state restored, this run's
hyper-parameters). Why not MONAI's own: ``CheckpointSaver`` writes non-atomically and has no fixed-name
"latest" file, and ``CheckpointLoader`` restores neither the AMP scaler nor the best-metric state, and
silently starts over when the saved run had already finished.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.networks.utils import get_state_dict

from custom.engines.checkpoint_files import CheckpointFiles
from custom.engines.monitoring import NonFiniteLossError
from custom.engines.preemption import PreemptionSignals, TrainingPreempted
from custom.engines.resume import apply_config_values, check_resume_recipe, config_values, restore_state
from custom.networks.weight_files import CheckpointError
from custom.utils import bare_module, is_main_process, require_bool

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["TrainingCheckpoint"]

logger = logging.getLogger(__name__)


class TrainingCheckpoint:
    """Keep ``<save_dir>/<filename>`` as the resumable state of a training run, and resume from it.

    Saved atomically every ``save_interval`` epochs, every ``checkpoint_interval`` iterations (when
    set), when training completes and when a stop signal arrives: each object of ``save_dict`` (model,
    optimizer, lr_scheduler, trainer), plus the trainer's AMP ``scaler``, the validator's best metric
    and the ``recipe``. Two generations: the file being replaced is kept as ``<stem>.prev<suffix>``
    (``checkpoint.prev.pt``). At ``Events.STARTED``, with ``resume`` and an existing file, everything
    is restored and training goes on from the saved iteration (mid-epoch too: ignite continues the
    epoch with the iterations it had left); a file whose run already reached ``max_epochs`` is refused
    (pass a larger ``max_epochs`` to train longer: the schedule is then stretched to it). With
    ``resume=False`` the files named in ``protect`` (and the previous generation) are renamed aside
    (``<name>.<timestamp>.bak``), never overwritten.

    Preemption: on SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before a kill; SLURM's
    ``--signal``), the current iteration finishes, the checkpoint is written, and the run raises
    :class:`~custom.engines.preemption.TrainingPreempted` (exit status 75,
    :data:`~custom.engines.preemption.PREEMPTED_EXIT_CODE`); the same command resumes at that
    iteration. Bounded time: the rest of the iteration (plus the validation, when the signal comes
    during one) and one save. Under DDP the ranks agree each iteration (an all-reduce of a stop flag),
    so every rank stops at the same iteration and rank 0 alone writes. Temporary files of saves killed
    earlier (by ``kill -9``) are removed at the start.

    A bad newest file is not the end: an empty, truncated or unreadable ``checkpoint.pt`` is named, kept
    as ``checkpoint.pt.<timestamp>.damaged``, and the run resumes from ``checkpoint.prev.pt``.

    A changed recipe: the ``recipe`` saved in the file is compared with this run's; a network or data
    value that differs (``feature_size``, ``roi_size``, ``pixdim``, the loss, ...) is refused naming both
    values (``accept_mismatch`` warns instead). A change of the learning rate, weight decay or schedule
    length (``max_epochs``, warm-up) is applied on resume: the optimizer's hyperparameters and the
    scheduler's settings (``base_lrs``, ``t_total``, ``warmup_steps``) are this run's, the scheduler's
    position is the checkpoint's, and the log says what changed. PyTorch's ``load_state_dict`` would
    otherwise bring back the saved values and silently ignore the command line.

    Weights this run did not write are never lost: with ``resume`` and no checkpoint, another file of
    ``protect`` (a ``model.pt`` a user put there for MONAI Label, or the one left after deleting a
    broken checkpoint) is copied to ``<name>.<timestamp>.bak`` at the start, with a warning naming
    both; the original stays in place until this run's best model replaces it. A copy rather than
    a refusal: MONAI Label's bundle training inserts a ``CheckpointLoader`` for ``models/model.pt``
    and expects the run to write its new best there, which a refusal would break; a copy rather than
    a rename, so that whatever serves ``model.pt`` keeps finding it while this run trains. An
    identical ``.bak`` already there (a run restarted before its first checkpoint) is not repeated.

    Errors name the file and the fix in one line (:class:`CheckpointError`): an empty, truncated or
    unsafe checkpoint, weights of another ``feature_size`` (read from the saved tensor shapes) or
    network, optimizer state that does not fit. When training stops on any error after the start, the
    log says what the checkpoint on disk still holds.

    Args:
        save_dir: the bundle's ``ckpt_dir``.
        save_dict: name -> object with ``state_dict``/``load_state_dict`` (model, optimizer, lr_scheduler);
            the engine this handler is attached to is added as ``"trainer"``.
        filename: ``checkpoint.pt`` in this collection's contract.
        resume: restore from an existing file (``True``) or start fresh (``False``).
        save_interval: epochs between saves.
        validator: the evaluator whose ``best_metric``/``best_metric_epoch`` are kept.
        protect: files in ``save_dir`` set aside on a fresh start.
        recipe: saved as ``"recipe"`` in the file (``custom.networks.recipe``: what produced these weights) and
            compared on resume.
        checkpoint_interval: also save every this many iterations; None: at epoch ends only.
        accept_mismatch: resume although the recipe differs (``--accept_recipe_mismatch True``).
        signals: names of the signals that stop training after a save.

    Raises:
        TypeError: ``resume`` or ``accept_mismatch`` is not a bool.
        ValueError: ``checkpoint_interval`` is not None or a positive integer.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        filename: str = "checkpoint.pt",
        resume: bool = True,
        save_interval: int = 1,
        validator: Engine | None = None,
        protect: Sequence[str] = ("checkpoint.pt", "model.pt"),
        recipe: Mapping[str, Any] | None = None,
        checkpoint_interval: int | None = None,
        accept_mismatch: bool = False,
        signals: Sequence[str] = ("SIGTERM", "SIGUSR1"),
    ) -> None:
        require_bool(resume, "resume")
        require_bool(accept_mismatch, "accept_recipe_mismatch")
        if checkpoint_interval is not None and (
            isinstance(checkpoint_interval, bool) or not isinstance(checkpoint_interval, int) or checkpoint_interval < 1
        ):
            raise ValueError(
                f"checkpoint_interval must be None (per epoch only) or a positive number of iterations, "
                f"got {checkpoint_interval!r}"
            )
        if "trainer" in save_dict:
            raise ValueError("save_dict must not contain 'trainer': the engine the handler is attached to is saved.")
        self.files = CheckpointFiles(Path(save_dir) / filename, protect)
        self.path = self.files.path
        self.previous = self.files.previous
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.save_interval = int(save_interval)
        self.validator = validator
        self.protect = self.files.protect
        self.recipe = recipe
        self.checkpoint_interval = checkpoint_interval
        self.accept_mismatch = accept_mismatch
        self.preemption = PreemptionSignals(signals)
        self._saved_iteration = -1
        self._saved_epoch: int | None = None
        self._reported: BaseException | None = None

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        self.save_dict["trainer"] = engine
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._stop_if_signalled)
        engine.add_event_handler(Events.COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.preemption.restore())
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.stopped)

    # -- stopping ---------------------------------------------------------------------------------
    def iteration_completed(self, engine: Engine) -> None:
        """Stop after a save when a signal came (on any rank); else save every ``checkpoint_interval`` iterations."""
        if self.preemption.stop_agreed():
            self._stop(engine)
        if self.checkpoint_interval and engine.state.iteration % self.checkpoint_interval == 0:
            self.save(engine)

    def _stop_if_signalled(self, engine: Engine) -> None:
        """At an epoch's end (after its validation and save): stop when a signal came during them."""
        if self.preemption.stop_agreed():
            self._stop(engine)

    def _stop(self, engine: Engine) -> None:
        self.save(engine)
        self.preemption.stop(engine, self.path)

    def stopped(self, engine: Engine, error: BaseException) -> None:
        """Log what the checkpoint on disk still holds, then re-raise ``error`` (the command exits non-zero).

        ignite re-raises an exception itself only when no handler is registered for EXCEPTION_RAISED,
        so this handler raises it again.
        """
        self.preemption.restore()
        reported, self._reported = self._reported, error  # ignite fires EXCEPTION_RAISED once per level it unwinds
        said = isinstance(error, (CheckpointError, NonFiniteLossError, TrainingPreempted))  # said it already
        if error is not reported and not said and is_main_process():
            where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
            if self._saved_epoch is not None:
                kept = f"{self.path} still holds epoch {self._saved_epoch} (written before the error)"
            elif self.path.is_file():
                kept = f"{self.path} is unchanged"
            else:
                kept = "no checkpoint had been written yet"
            logger.error(
                f"training stopped at {where} by a {type(error).__name__} (its message is above and below); "
                f"{kept}. Fix the cause and run the same command to resume."
            )
        raise error

    # -- saving -----------------------------------------------------------------------------------
    def state_dict(self, engine: Engine) -> dict[str, Any]:
        state = {k: get_state_dict(v) for k, v in self.save_dict.items()}
        scaler = getattr(engine, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if self.validator is not None:
            state["validator"] = {
                "best_metric": float(self.validator.state.best_metric),
                "best_metric_epoch": int(self.validator.state.best_metric_epoch),
            }
        if self.recipe is not None:
            state["recipe"] = dict(self.recipe)
        return state

    def save(self, engine: Engine) -> None:
        if engine.state.iteration == self._saved_iteration:  # COMPLETED right after the last EPOCH_COMPLETED
            return
        self._saved_iteration = engine.state.iteration
        if is_main_process():
            self.files.write(self.state_dict(engine))
            self._saved_epoch = engine.state.epoch
            logger.info(f"saved {self.path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")

    # -- resuming ---------------------------------------------------------------------------------
    def load(self, engine: Engine) -> None:
        self.preemption.install(engine)
        if is_main_process():
            self.files.remove_stale()
        if not self.resume:
            self.files.set_aside()
            return
        found = self.files.choose()
        if found is None:
            self.files.keep_copies()
            logger.info(f"no {self.path}: training from the start")
            return
        source, ckpt = found
        missing = [k for k in self.save_dict if k not in ckpt]
        if missing:
            raise CheckpointError(
                f"{source} lacks {missing}: not a checkpoint of this bundle; pass --resume False to start over "
                "(it is then kept as a .bak file)."
            )
        check_resume_recipe(source, ckpt.get("recipe"), self.recipe, self.accept_mismatch)
        saved = ckpt["trainer"]
        max_epochs = engine.state.max_epochs
        saved_epoch = int(saved.get("epoch", saved["iteration"] // max(saved["epoch_length"], 1)))
        if saved_epoch >= max_epochs:
            raise CheckpointError(
                f"{source} is from a run that already finished {saved_epoch} of max_epochs={max_epochs} epochs. "
                f"To train longer pass a larger --max_epochs (the learning-rate schedule is stretched to it); "
                "to start over pass --resume False (the old checkpoint.pt and model.pt are then kept as .bak files)."
            )
        optimizer, scheduler = self.save_dict.get("optimizer"), self.save_dict.get("lr_scheduler")
        fresh = config_values(optimizer, scheduler)
        for k, obj in self.save_dict.items():
            if k != "trainer":
                restore_state(source, k, bare_module(obj), ckpt[k])
        engine.load_state_dict(saved)
        engine.state.max_epochs = max_epochs
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if self.validator is not None and "validator" in ckpt:
            self.validator.state.best_metric = ckpt["validator"]["best_metric"]
            self.validator.state.best_metric_epoch = ckpt["validator"]["best_metric_epoch"]
        apply_config_values(optimizer, scheduler, fresh, source, saved.get("max_epochs"), max_epochs)
        logger.info(
            f"resumed from {source}: epoch {engine.state.epoch}, iteration {engine.state.iteration} "
            f"(pass --resume False to start over)"
        )
