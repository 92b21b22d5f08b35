"""Ignite handlers for checkpoints and evaluation reports.

Why not MONAI's own: ``CheckpointSaver`` writes non-atomically (a kill during a save leaves a torn
file), has no fixed-name "latest" file, and ``CheckpointLoader`` restores neither the AMP scaler nor
the best-metric state, and silently starts over when the saved run had already finished.
``MetricsSaver`` writes CSV without class names; the bundles promise ``metrics.json`` by organ name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import string_list_all_gather

from .utils import atomic_torch_save, atomic_write, is_main_process

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["TrainingCheckpoint", "BestModelSaver", "EvaluationReport", "NonFiniteLossError", "StopOnNonFiniteLoss"]

logger = logging.getLogger(__name__)


def _module(obj: Any) -> Any:
    """The model inside a DDP/DataParallel wrapper, so checkpoints carry no ``module.`` prefix."""
    return obj.module if isinstance(obj, torch.nn.Module) and hasattr(obj, "module") else obj


class TrainingCheckpoint:
    """Keep ``<save_dir>/<filename>`` as the resumable state of a training run, and resume from it.

    Saved atomically every ``save_interval`` epochs and when training completes: each object of
    ``save_dict`` (model, optimizer, lr_scheduler, trainer), plus the trainer's AMP ``scaler`` and the
    validator's best metric. At ``Events.STARTED``, with ``resume`` and an existing file, everything is
    restored and training goes on from the saved epoch; a file whose run already reached
    ``max_epochs`` is refused (raise ``max_epochs`` to train longer). With ``resume=False`` the files
    named in ``protect`` are renamed aside (``<name>.<timestamp>.bak``), never overwritten.

    Args:
        save_dir: the bundle's ``ckpt_dir``.
        save_dict: name -> object with ``state_dict``/``load_state_dict`` (model, optimizer, lr_scheduler);
            the engine this handler is attached to is added as ``"trainer"``.
        filename: ``checkpoint.pt`` in this collection's contract.
        resume: restore from an existing file (``True``) or start fresh (``False``).
        save_interval: epochs between saves.
        validator: the evaluator whose ``best_metric``/``best_metric_epoch`` are kept.
        protect: files in ``save_dir`` set aside on a fresh start.
        recipe: saved as ``"recipe"`` in the file (``custom.recipe``: what produced these weights).
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
    ) -> None:
        if not isinstance(resume, bool):
            raise TypeError(
                f"resume must be True or False, got {resume!r}: write `--resume False` on the command line."
            )
        if "trainer" in save_dict:
            raise ValueError("save_dict must not contain 'trainer': the engine the handler is attached to is saved.")
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.save_interval = int(save_interval)
        self.validator = validator
        self.protect = tuple(protect)
        self.recipe = recipe
        self._saved_iteration = -1

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        self.save_dict["trainer"] = engine
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def state_dict(self, engine: Engine) -> dict[str, Any]:
        state = {k: _module(v).state_dict() for k, v in self.save_dict.items()}
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
            atomic_torch_save(self.state_dict(engine), self.path)
            logger.info(f"saved {self.path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")

    def load(self, engine: Engine) -> None:
        if not self.resume:
            self._set_aside()
            return
        if not self.path.is_file():
            logger.info(f"no {self.path}: training from the start")
            return
        ckpt = torch.load(self.path, map_location="cpu", weights_only=True)
        missing = [k for k in self.save_dict if k not in ckpt]
        if missing:
            raise RuntimeError(f"{self.path} lacks {missing}: not a checkpoint of this bundle; use --resume False.")
        saved = ckpt["trainer"]
        max_epochs = engine.state.max_epochs
        saved_epoch = int(saved.get("epoch", saved["iteration"] // max(saved["epoch_length"], 1)))
        if saved_epoch >= max_epochs:
            raise RuntimeError(
                f"{self.path} is from a run that already finished {saved_epoch} of max_epochs={max_epochs} epochs. "
                f"To train longer pass a larger --max_epochs; to start over pass --resume False "
                "(the old checkpoint.pt and model.pt are then kept as .bak files)."
            )
        for k, obj in self.save_dict.items():
            if k != "trainer":
                _module(obj).load_state_dict(ckpt[k])
        engine.load_state_dict(saved)
        engine.state.max_epochs = max_epochs
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if self.validator is not None and "validator" in ckpt:
            self.validator.state.best_metric = ckpt["validator"]["best_metric"]
            self.validator.state.best_metric_epoch = ckpt["validator"]["best_metric_epoch"]
        logger.info(
            f"resumed from {self.path}: epoch {engine.state.epoch}, iteration {engine.state.iteration} "
            f"(pass --resume False to start over)"
        )

    def _set_aside(self) -> None:
        if not is_main_process():
            return
        stamp = time.strftime("%Y%m%d_%H%M%S")
        for name in self.protect:
            old = self.path.parent / name
            if old.is_file():
                new = old.with_name(f"{name}.{stamp}.bak")
                os.replace(old, new)
                logger.warning(f"--resume False: kept the previous {old.name} as {new}")


class BestModelSaver:
    """Write the network's weights to ``<save_dir>/<filename>`` whenever the evaluator's key metric
    reaches a new best. Attach to the evaluator; atomic, rank 0 only.

    Args:
        save_dir: the bundle's ``ckpt_dir``.
        network: the model (a DDP wrapper is unwrapped).
        filename: ``model.pt`` for the fine-tuning bundles.
        state_transform: maps the plain state_dict to what is saved (the SSL bundle writes the
            released ``model_swinvit.pt`` layout); None saves the state_dict itself.
        recipe: saved with the weights (``custom.recipe.with_recipe``): ``{"model": state_dict, "recipe": ...}``.
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
            from .recipe import with_recipe

            state = _module(self.network).state_dict()
            payload = state if self.state_transform is None else self.state_transform(state)
            atomic_torch_save(with_recipe(payload, self.recipe), self.path)
            logger.info(
                f"saved {self.path}: best {engine.state.key_metric_name} {engine.state.best_metric:.4f} "
                f"at epoch {engine.state.epoch}"
            )


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss:
    """Stop training with a clear error the first time the loss is NaN or infinite.

    ignite's ``TerminateOnNan`` ends the run quietly (a warning, exit status 0); a multi-day run then
    looks finished. This raises instead, so the command exits non-zero; the checkpoint of the last
    completed epoch is left as it was (checkpoints are written at epoch ends only), and resuming
    from it with a lower ``learning_rate`` is the usual fix.

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
                    f"iteration {engine.state.iteration}: stopped. The checkpoint of the last completed epoch in "
                    f"{self.ckpt_dir or 'ckpt_dir'} is kept; resume from it (the same command) with a lower "
                    "--learning_rate, or check the data with the check_data command."
                )


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


class EvaluationReport:
    """Write ``metrics.json`` (Dice per class by name, mean, per case) and a PNG per case.

    Reads the per-case, per-class scores the metric handler keeps (``save_details=True``) in
    ``engine.state.metric_details[metric_name]``, shape ``(cases, classes)``, already gathered across
    DDP ranks by MONAI; case names are gathered here in the same order. A class absent from both
    label and prediction of a case scores NaN there (MONAI's ``ignore_empty``): it is written as
    ``null`` and left out of that class's mean.

    Args:
        output_dir: where ``metrics.json`` and the ``<case>.png`` pictures go.
        class_names: names by channel index, background first (from metadata.json).
        metric_name: the evaluator's metric to report, e.g. ``val_mean_dice``.
        include_background: whether the metric's first column is the background.
        save_png: draw image | label | prediction for each case (by the rank that evaluated it).
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        metric_name: str = "val_mean_dice",
        include_background: bool = False,
        save_png: bool = True,
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.metric_name = metric_name
        self.include_background = include_background
        self.save_png = save_png
        self.keys = (image_key, label_key, pred_key)
        self._cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    @staticmethod
    def case_name(item: Mapping[str, Any], key: str) -> str:
        meta = getattr(item[key], "meta", {})
        name = Path(str(meta.get("filename_or_obj", f"case{id(item)}"))).name
        for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    def iteration_completed(self, engine: Engine) -> None:
        from .visualize import save_overlay_png

        image_key, label_key, pred_key = self.keys
        for item in engine.state.output:
            case = self.case_name(item, image_key)
            self._cases.append(case)
            if self.save_png:
                save_overlay_png(
                    self.output_dir / f"{case}.png",
                    item[image_key],
                    item[label_key],
                    item[pred_key],
                    title=case,
                    background_channel=not self.include_background,
                )

    def epoch_completed(self, engine: Engine) -> None:
        details = engine.state.metric_details.get(self.metric_name)
        cases = string_list_all_gather(self._cases) if torch.distributed.is_initialized() else list(self._cases)
        if not is_main_process():
            return
        if details is None:
            raise RuntimeError(f"no per-case details for {self.metric_name}: set save_details True on that metric.")
        scores = torch.as_tensor(details, dtype=torch.float64).reshape(len(cases), -1)
        names = self.class_names if self.include_background else self.class_names[1:]
        if scores.shape[1] != len(names):
            raise ValueError(
                f"{self.metric_name} has {scores.shape[1]} classes but metadata names {len(names)}: {names}"
            )
        per_class = {n: _nan_to_none(torch.nanmean(scores[:, i]).item()) for i, n in enumerate(names)}
        valid = [v for v in per_class.values() if v is not None]
        report = {
            "metric": "dice",
            "mean_dice": _nan_to_none(sum(valid) / len(valid)) if valid else None,
            "class_dice": per_class,
            "cases": [
                {
                    "case": case,
                    "mean_dice": _nan_to_none(torch.nanmean(row).item()),
                    "dice": {n: _nan_to_none(v) for n, v in zip(names, row.tolist(), strict=True)},
                }
                for case, row in zip(cases, scores, strict=True)
            ],
            "note": "null = class absent from both label and prediction of that case; left out of the means",
        }
        path = self.output_dir / "metrics.json"
        atomic_write(path, lambda f: f.write(json.dumps(report, indent=4)), mode="w")
        logger.info(f"wrote {path}: mean Dice {report['mean_dice']} over {len(cases)} cases")
