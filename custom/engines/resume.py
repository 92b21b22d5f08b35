"""Resuming from a checkpoint: the recipe check, the restoring of each state, and this run's hyper-parameters.

What ``custom.engines.training_checkpoint.TrainingCheckpoint`` does at ``Events.STARTED`` besides reading the
file. A network or data value of the saved recipe that differs from this run's is refused, naming both
values (:func:`check_resume_recipe`). Each state is loaded with a one-line error naming the file
(:func:`restore_state`). PyTorch's ``load_state_dict`` brings back the saved learning rate, weight decay
and schedule and silently ignores the command line; :func:`config_values` reads this run's values before
the checkpoint replaces them and :func:`apply_config_values` puts them back, logging what changed.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from custom.networks.recipe import RESUME_KEYS, recipe_values, same_value
from custom.networks.weight_files import CheckpointError, state_mismatch
from custom.utils import one_line_reason

__all__ = ["check_resume_recipe", "restore_state", "config_values", "apply_config_values"]

logger = logging.getLogger(__name__)

#: scheduler state that moves with training, not set by the config
_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "verbose", "_is_initial"}


def check_resume_recipe(
    source: Path, saved: Any, recipe: Mapping[str, Any] | None, accept_mismatch: bool = False
) -> None:
    """Refuse a network or data value that differs from the checkpoint's recipe, naming both values.

    Compared by config id (``custom.networks.recipe.RESUME_KEYS``), whichever recipe format the checkpoint
    holds; the schedule and the augmentation may change at a resume (:func:`apply_config_values` logs them).

    Args:
        source: the checkpoint file (named in the message).
        saved: its ``"recipe"`` (anything else than a mapping: nothing to compare).
        recipe: this run's recipe (None or empty: nothing to compare).
        accept_mismatch: warn instead of refusing (``--accept_recipe_mismatch True``).

    Raises:
        CheckpointError: a value differs and ``accept_mismatch`` is False.
    """
    if not isinstance(saved, Mapping) or not recipe:
        return
    before, now = recipe_values(saved, RESUME_KEYS), recipe_values(recipe, RESUME_KEYS)
    diffs = [(k, before[k], v) for k, v in now.items() if k in before and not same_value(before[k], v)]
    if not diffs:
        return
    said = "; ".join(f"{k}={r!r} (this run: {k}={v!r})" for k, r, v in diffs)
    if accept_mismatch:
        logger.warning(f"{source} was trained with {said}; --accept_recipe_mismatch True: resuming anyway")
        return
    passes = " ".join(
        f"--{k} {json.dumps(r)!r}" if not isinstance(r, (int, float)) else f"--{k} {r}" for k, r, _ in diffs
    )
    raise CheckpointError(
        f"{source} was trained with {said}: a resume must keep the network and data recipe. Pass {passes} "
        f"to resume, or --resume False to start over (the checkpoint is then kept as a .bak file)."
    )


def restore_state(source: Path, name: str, obj: Any, state: Any) -> None:
    """``obj.load_state_dict(state)``, with a mismatch said in one line naming the file.

    Raises:
        CheckpointError: ``state`` does not fit ``obj``.
    """
    try:
        obj.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        if isinstance(obj, torch.nn.Module) and isinstance(state, Mapping):
            # from None: PyTorch's message lists every mismatching tensor (678 lines for a feature_size change)
            raise CheckpointError(state_mismatch(source, name, obj, state)) from None
        raise CheckpointError(
            f"{source}: its {name!r} state does not fit this run ({one_line_reason(e, 200, innermost=False)}). "
            "Resume with the settings it was trained with, or pass --resume False to start over (it is then kept "
            "as a .bak)."
        ) from None


def config_values(optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """This run's optimizer hyperparameters and scheduler settings, before the checkpoint replaces them.

    Args:
        optimizer: the run's optimizer (None: none).
        scheduler: the run's learning-rate scheduler (None: none).
    """
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


def apply_config_values(
    optimizer: Any, scheduler: Any, fresh: Mapping[str, Any], source: Path, saved_max: Any, max_epochs: int
) -> None:
    """Put this run's learning rate, hyperparameters and schedule length back where the checkpoint differs.

    Args:
        optimizer, scheduler: as restored from the checkpoint.
        fresh: :func:`config_values` of this run, read before the restore.
        source: the checkpoint file (named in the log).
        saved_max: the ``max_epochs`` the checkpoint's run had.
        max_epochs: this run's.
    """
    changes: list[str] = []
    for k, v in fresh["scheduler"].items():
        old = getattr(scheduler, k, None)
        if k != "lr_lambdas" and not same_value(old, v):
            setattr(scheduler, k, v)
            changes.append(f"lr_scheduler {k} {old} -> {v}")
    with_schedule = bool(fresh["scheduler"]) and hasattr(scheduler, "base_lrs")
    for i, (group, values) in enumerate(zip(getattr(optimizer, "param_groups", []), fresh["groups"], strict=True)):
        for k, v in values.items():
            if k == "initial_lr" or (k == "lr" and with_schedule) or k not in group or same_value(group[k], v):
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
                base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
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
