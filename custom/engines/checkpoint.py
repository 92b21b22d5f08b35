"""Ignite handlers for checkpoints: resumable training state, the best model, weights for inference.

Why not MONAI's own: ``CheckpointSaver`` writes non-atomically (a kill during a save leaves a torn
file), has no fixed-name "latest" file, and ``CheckpointLoader`` restores neither the AMP scaler nor
the best-metric state, and silently starts over when the saved run had already finished.
"""

from __future__ import annotations

import copy
import filecmp
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.networks.utils import get_state_dict

from custom.utils import (
    atomic_torch_save,
    atomic_write,
    bare_module,
    is_main_process,
    remove_stale_temporaries,
    require_bool,
)

from .monitoring import NonFiniteLossError

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "TrainingCheckpoint",
    "TrainingPreempted",
    "PREEMPTED_EXIT_CODE",
    "CheckpointError",
    "ModelLoader",
    "read_weights",
    "BestModelSaver",
]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume; the message names the file and the fix."""


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


#: scheduler state that moves with training, not set by the config
_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "verbose", "_is_initial"}


def _copy_into(src: Path, f: Any) -> None:
    with open(src, "rb") as source:
        shutil.copyfileobj(source, f)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: what to do about weights that do not fit, when resuming (checkpoint.pt) and when loading model.pt
_RESUME_FIX = "or --resume False to start over (the checkpoint is then kept as a .bak file)"
_MODEL_FIX = "or point --ckpt_dir at the weights trained with this config"


def _state_mismatch(
    path: Path, name: str, network: torch.nn.Module, saved: Mapping[str, Any], fix: str = _RESUME_FIX
) -> str:
    """One line on why ``saved`` does not fit ``network``: the feature_size it was trained with, when that is it.

    A Swin UNETR's (and the SSL head's) ``patch_embed.proj.weight`` has ``feature_size`` output channels,
    so the saved value is read from that tensor's shape instead of PyTorch's dump of every mismatch.
    """
    current = network.state_dict()
    embed = [k for k in saved if k.endswith("patch_embed.proj.weight") and k in current]
    if embed:
        key = embed[0]
        was, now = int(saved[key].shape[0]), int(current[key].shape[0])
        if was != now:
            return (
                f"{path} was trained with feature_size={was} ({key} has {was} output channels), this run builds "
                f"feature_size={now}: pass --feature_size {was}, {fix}."
            )
    differ = [k for k in saved if k in current and tuple(saved[k].shape) != tuple(current[k].shape)]
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    parts = []
    if differ:
        k = differ[0]
        parts.append(
            f"{len(differ)} tensors differ in shape (first: {k} saved {list(saved[k].shape)}, "
            f"this network {list(current[k].shape)})"
        )
    if missing:
        parts.append(f"{len(missing)} of this network's tensors missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unknown tensors (first: {unexpected[0]})")
    return (
        f"{path}: its {name!r} weights do not fit this network ({'; '.join(parts)}). Use the settings it "
        f"was trained with (feature_size, in/out channels, network options), {fix}."
    )


def read_weights(path: Path, use: str = "no segmentation can be made with it", fix: str = _MODEL_FIX) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; an empty, truncated or unsafe file is named in one line with ``fix``."""
    size = path.stat().st_size
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path}: refused to load, it holds objects other than tensors and plain values "
                f"(Weights only load failed: {_one_line(e, 200)}). Not a file of this bundle; {fix.removeprefix('or ')}."
            ) from None
        what = "empty (0 bytes)" if size == 0 else f"truncated or damaged ({size} bytes; {_one_line(e, 160)})"
        raise CheckpointError(
            f"{path} is {what}: {use} (an interrupted copy or a full disk?). Put back a complete copy, {fix}."
        ) from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(ckpt).__name__}, not weights of this bundle; {fix.removeprefix('or ')}."
        )
    return dict(ckpt)


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
    :class:`TrainingPreempted` (exit status :data:`PREEMPTED_EXIT_CODE`); the same command resumes at that
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
        self.path = Path(save_dir) / filename
        self.previous = self.path.with_name(f"{self.path.stem}.prev{self.path.suffix}")
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.save_interval = int(save_interval)
        self.validator = validator
        self.protect = tuple(protect)
        self.recipe = recipe
        self.checkpoint_interval = checkpoint_interval
        self.accept_mismatch = accept_mismatch
        self.signals = tuple(getattr(signal, s) for s in signals if hasattr(signal, s))
        self._saved_iteration = -1
        self._saved_epoch: int | None = None
        self._reported: BaseException | None = None
        self._engine: Engine | None = None
        self._signal: int | None = None
        self._signal_iteration: int | None = None
        self._handlers: dict[int, Any] = {}

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        self.save_dict["trainer"] = engine
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._stop_if_signalled)
        engine.add_event_handler(Events.COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, lambda _: self._restore_signals())
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.stopped)

    # -- signals ----------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only; the default action stays
        for sig in self.signals:
            self._handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, previous in self._handlers.items():
            signal.signal(sig, previous)
        self._handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Only note it (the training loop stops at the end of the iteration); a save in progress goes on."""
        if self._signal is None:
            self._signal = signum
            self._signal_iteration = self._engine.state.iteration if self._engine is not None else None

    def _stop_agreed(self) -> bool:
        """Whether any rank was signalled: one all-reduce (MAX) of a flag, so every rank stops at this iteration."""
        local = self._signal is not None
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([int(local)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def iteration_completed(self, engine: Engine) -> None:
        """Stop after a save when a signal came (on any rank); else save every ``checkpoint_interval`` iterations."""
        if self._stop_agreed():
            self._stop(engine)
        if self.checkpoint_interval and engine.state.iteration % self.checkpoint_interval == 0:
            self.save(engine)

    def _stop_if_signalled(self, engine: Engine) -> None:
        """At an epoch's end (after its validation and save): stop when a signal came during them."""
        if self._stop_agreed():
            self._stop(engine)

    def _stop(self, engine: Engine) -> None:
        self.save(engine)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank exits (and makes torchrun kill the others) before rank 0 has written
        self._restore_signals()
        name = signal.Signals(self._signal).name if self._signal is not None else "a stop signal on another rank"
        during = f" (received at iteration {self._signal_iteration})" if self._signal_iteration else ""
        message = (
            f"{name}{during}: stopped after iteration {engine.state.iteration} (epoch {engine.state.epoch}) and "
            f"saved {self.path}; exit status {PREEMPTED_EXIT_CODE}. Run the same command to resume there."
        )
        if is_main_process():
            logger.warning(message)
        raise TrainingPreempted(message)

    def stopped(self, engine: Engine, error: BaseException) -> None:
        """Log what the checkpoint on disk still holds, then re-raise ``error`` (the command exits non-zero).

        ignite re-raises an exception itself only when no handler is registered for EXCEPTION_RAISED,
        so this handler raises it again.
        """
        self._restore_signals()
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
            atomic_torch_save(self.state_dict(engine), self.path, previous=self.previous)
            self._saved_epoch = engine.state.epoch
            logger.info(f"saved {self.path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")

    # -- resuming ---------------------------------------------------------------------------------
    def load(self, engine: Engine) -> None:
        self._install_signals()
        if is_main_process():
            for tmp in remove_stale_temporaries(self.path):
                logger.info(f"removed {tmp}, left by a save that was killed")
        if not self.resume:
            self._set_aside()
            return
        found = self._choose()
        if found is None:
            self._keep_copies()
            logger.info(f"no {self.path}: training from the start")
            return
        source, ckpt = found
        missing = [k for k in self.save_dict if k not in ckpt]
        if missing:
            raise CheckpointError(
                f"{source} lacks {missing}: not a checkpoint of this bundle; pass --resume False to start over "
                "(it is then kept as a .bak file)."
            )
        self._check_recipe(source, ckpt.get("recipe"))
        saved = ckpt["trainer"]
        max_epochs = engine.state.max_epochs
        saved_epoch = int(saved.get("epoch", saved["iteration"] // max(saved["epoch_length"], 1)))
        if saved_epoch >= max_epochs:
            raise CheckpointError(
                f"{source} is from a run that already finished {saved_epoch} of max_epochs={max_epochs} epochs. "
                f"To train longer pass a larger --max_epochs (the learning-rate schedule is stretched to it); "
                "to start over pass --resume False (the old checkpoint.pt and model.pt are then kept as .bak files)."
            )
        fresh = self._config_values()
        for k, obj in self.save_dict.items():
            if k != "trainer":
                self._restore(source, k, bare_module(obj), ckpt[k])
        engine.load_state_dict(saved)
        engine.state.max_epochs = max_epochs
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if self.validator is not None and "validator" in ckpt:
            self.validator.state.best_metric = ckpt["validator"]["best_metric"]
            self.validator.state.best_metric_epoch = ckpt["validator"]["best_metric_epoch"]
        self._apply_config_values(fresh, source, saved.get("max_epochs"), max_epochs)
        logger.info(
            f"resumed from {source}: epoch {engine.state.epoch}, iteration {engine.state.iteration} "
            f"(pass --resume False to start over)"
        )

    def _choose(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable generation and its content: ``checkpoint.pt``, else ``checkpoint.prev.pt``."""
        if not self.path.is_file():
            if not self.previous.is_file():
                return None
            logger.warning(f"no {self.path} but {self.previous} (a save interrupted between its two renames)")
            return self.previous, self._read(self.previous)
        try:
            return self.path, self._read(self.path)
        except CheckpointError as newest:
            if not self.previous.is_file():
                raise
            try:
                ckpt = self._read(self.previous)
            except CheckpointError as older:
                raise CheckpointError(f"{newest} The previous generation cannot be used either: {older}") from None
            kept = self.path.with_name(f"{self.path.name}.{time.strftime('%Y%m%d_%H%M%S')}.damaged")
            if is_main_process():
                os.replace(self.path, kept)
            logger.warning(
                f"{newest} Resuming from the previous checkpoint {self.previous}; the damaged file is {kept}"
            )
            self._keep_copies(f"may be newer than {self.previous.name}, whose best metric this run resumes with")
            return self.previous, ckpt

    def _check_recipe(self, source: Path, saved: Any) -> None:
        """Refuse a network or data value that differs from the checkpoint's recipe, naming both values.

        Compared by config id (``custom.networks.recipe.RESUME_KEYS``), whichever recipe format the checkpoint
        holds; the schedule and the augmentation may change at a resume (logged by ``_apply_config_values``).
        """
        if not isinstance(saved, Mapping) or not self.recipe:
            return
        from custom.networks.recipe import RESUME_KEYS, recipe_values, same_value

        before, now = recipe_values(saved, RESUME_KEYS), recipe_values(self.recipe, RESUME_KEYS)
        diffs = [(k, before[k], v) for k, v in now.items() if k in before and not same_value(before[k], v)]
        if not diffs:
            return
        said = "; ".join(f"{k}={r!r} (this run: {k}={v!r})" for k, r, v in diffs)
        if self.accept_mismatch:
            logger.warning(f"{source} was trained with {said}; --accept_recipe_mismatch True: resuming anyway")
            return
        passes = " ".join(
            f"--{k} {json.dumps(r)!r}" if not isinstance(r, (int, float)) else f"--{k} {r}" for k, r, _ in diffs
        )
        raise CheckpointError(
            f"{source} was trained with {said}: a resume must keep the network and data recipe. Pass {passes} "
            f"to resume, or --resume False to start over (the checkpoint is then kept as a .bak file)."
        )

    def _config_values(self) -> dict[str, Any]:
        """This run's optimizer hyperparameters and scheduler settings, before the checkpoint replaces them."""
        optimizer, scheduler = self.save_dict.get("optimizer"), self.save_dict.get("lr_scheduler")
        groups = (
            [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            if (optimizer is not None and hasattr(optimizer, "param_groups"))
            else []
        )
        sched = (
            copy.deepcopy({k: v for k, v in scheduler.state_dict().items() if k not in _PROGRESS})
            if scheduler is not None and hasattr(scheduler, "state_dict")
            else {}
        )
        return {"groups": groups, "scheduler": sched}

    def _apply_config_values(self, fresh: Mapping[str, Any], source: Path, saved_max: Any, max_epochs: int) -> None:
        """Put this run's learning rate, hyperparameters and schedule length back where the checkpoint differs."""
        from custom.networks.recipe import same_value as _same

        optimizer, scheduler = self.save_dict.get("optimizer"), self.save_dict.get("lr_scheduler")
        changes: list[str] = []
        for k, v in fresh["scheduler"].items():
            old = getattr(scheduler, k, None)
            if k != "lr_lambdas" and not _same(old, v):
                setattr(scheduler, k, v)
                changes.append(f"lr_scheduler {k} {old} -> {v}")
        with_schedule = bool(fresh["scheduler"]) and hasattr(scheduler, "base_lrs")
        for i, (group, values) in enumerate(zip(getattr(optimizer, "param_groups", []), fresh["groups"], strict=True)):
            for k, v in values.items():
                if k == "initial_lr" or (k == "lr" and with_schedule) or k not in group or _same(group[k], v):
                    continue
                changes.append(f"optimizer group {i} {k} {group[k]} -> {v}")
                group[k] = v
        if with_schedule:
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["initial_lr"] = base
            if any("base_lrs" in c or "t_total" in c or "warmup" in c for c in changes) and hasattr(
                scheduler, "lr_lambdas"
            ):
                lrs = [
                    base * f(scheduler.last_epoch)
                    for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
                ]
                for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                    group["lr"] = lr
                scheduler._last_lr = lrs
        if changes:
            said = f"max_epochs {saved_max} -> {max_epochs}; " if saved_max != max_epochs else ""
            logger.warning(
                f"resuming from {source} with this run's values where they differ from the checkpoint's: {said}"
                + "; ".join(changes)
                + f" (learning rate now {[g['lr'] for g in optimizer.param_groups]})"
            )
        elif saved_max != max_epochs:
            logger.warning(f"resuming from {source} with max_epochs {saved_max} -> {max_epochs}")

    def _read(self, path: Path) -> dict[str, Any]:
        """The checkpoint's content; an empty, truncated or unsafe file is named with its fix."""
        return read_weights(path, "it cannot be resumed from", _RESUME_FIX)

    def _restore(self, source: Path, name: str, obj: Any, state: Any) -> None:
        """``obj.load_state_dict(state)``, with a mismatch said in one line naming the file."""
        try:
            obj.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as e:
            if isinstance(obj, torch.nn.Module) and isinstance(state, Mapping):
                # from None: PyTorch's message lists every mismatching tensor (678 lines for a feature_size change)
                raise CheckpointError(_state_mismatch(source, name, obj, state)) from None
            raise CheckpointError(
                f"{source}: its {name!r} state does not fit this run ({_one_line(e, 200)}). Resume with the "
                "settings it was trained with, or pass --resume False to start over (it is then kept as a .bak)."
            ) from None

    def _keep_copies(self, reason: str | None = None) -> None:
        """Copy the files of ``protect`` that no checkpoint accounts for to ``.bak`` (see the class docstring).

        Args:
            reason: why they are copied, when not "no checkpoint beside them" (resuming from the previous
                generation: ``model.pt`` may be better than that checkpoint's best metric says).
        """
        if not is_main_process():
            return
        why = reason or f"was not written by this run (no {self.path.name} beside it)"
        stamp = time.strftime("%Y%m%d_%H%M%S")
        for name in self.protect:
            old = self.path.parent / name
            if name == self.path.name or not old.is_file():
                continue
            same = [b for b in sorted(old.parent.glob(f"{name}.*.bak")) if filecmp.cmp(old, b, shallow=False)]
            if same:
                logger.warning(f"{old} {why}; a copy is in {same[0]}")
                continue
            copy = old.with_name(f"{name}.{stamp}.bak")
            atomic_write(copy, lambda f, src=old: _copy_into(src, f))
            logger.warning(f"{old} {why}: kept a copy as {copy}; this run's best model will replace {name}")

    def _set_aside(self) -> None:
        if not is_main_process():
            return
        stamp = time.strftime("%Y%m%d_%H%M%S")
        for name in (*self.protect, self.previous.name):
            old = self.path.parent / name
            if old.is_file():
                new = old.with_name(f"{name}.{stamp}.bak")
                os.replace(old, new)
                logger.warning(f"--resume False: kept the previous {old.name} as {new}")


class ModelLoader:
    """Load ``model.pt`` into the network at the start of evaluation or inference, or say in one line why not.

    MONAI's ``CheckpointLoader`` (which this calls) answers a missing file with a bare
    ``FileNotFoundError``, an empty or truncated one with ``EOFError`` or "failed finding central
    directory", and weights of another ``feature_size`` with PyTorch's dump of every mismatching tensor
    (678 lines). Here each becomes a :class:`CheckpointError` naming the file and the value it was
    trained with (read from the saved ``patch_embed`` shape). Both the plain state_dict and the
    ``{"model": state_dict, "recipe": ...}`` layout load.

    Args:
        load_path: the weights, ``@ckpt_dir/model.pt``.
        network: the model to fill.
        map_location: passed to ``CheckpointLoader``.
    """

    def __init__(self, load_path: str, network: torch.nn.Module, map_location: Any = None) -> None:
        self.path = Path(load_path)
        self.network = network
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from monai.handlers import CheckpointLoader

        if not self.path.is_file():
            raise CheckpointError(
                f"{self.path}: no trained weights there; train first, or point --ckpt_dir at the folder holding "
                "model.pt."
            )
        saved = read_weights(self.path)
        state = saved.get("model", saved)
        loader = CheckpointLoader(str(self.path), {"model": self.network}, map_location=self.map_location)
        try:
            loader(engine)
        except (RuntimeError, ValueError, KeyError) as e:
            if isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values()):
                # from None: PyTorch's message lists every mismatching tensor (678 lines for a feature_size change)
                raise CheckpointError(
                    _state_mismatch(self.path, "model", bare_module(self.network), state, _MODEL_FIX)
                ) from None
            raise CheckpointError(f"{self.path}: cannot be loaded into this network ({_one_line(e, 200)}).") from None


class BestModelSaver:
    """Write the network's weights to ``<save_dir>/<filename>`` whenever the evaluator's key metric
    reaches a new best. Attach to the evaluator; atomic, rank 0 only.

    Args:
        save_dir: the bundle's ``ckpt_dir``.
        network: the model (a DDP wrapper is unwrapped).
        filename: ``model.pt`` for the fine-tuning bundles.
        state_transform: maps the plain state_dict to what is saved (the SSL bundle writes the
            released ``model_swinvit.pt`` layout); None saves the state_dict itself.
        recipe: saved with the weights (``custom.networks.recipe.with_recipe``): ``{"model": state_dict, "recipe": ...}``.
    """

    def __init__(
        self,
        save_dir: str,
        network: torch.nn.Module,
        filename: str = "model.pt",
        state_transform: Callable[[dict], Any] | None = None,
        recipe: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.network = network
        self.state_transform = state_transform
        self.recipe = recipe

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.best_metric_epoch == engine.state.epoch and is_main_process():
            from custom.networks.recipe import with_recipe

            state = get_state_dict(self.network)
            payload = state if self.state_transform is None else self.state_transform(state)
            atomic_torch_save(with_recipe(payload, self.recipe), self.path)
            logger.info(
                f"saved {self.path}: best {engine.state.key_metric_name} {engine.state.best_metric:.4f} "
                f"at epoch {engine.state.epoch}"
            )
