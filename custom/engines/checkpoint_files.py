"""The files of a training run: ``checkpoint.pt`` and its previous generation, ``model.pt``, and what is kept aside.

Why not MONAI's own: ``CheckpointSaver`` writes non-atomically (a kill during a save leaves a torn file)
and has no fixed-name "latest" file; ``CheckpointLoader`` answers a missing, empty or truncated
``model.pt`` and weights of another ``feature_size`` with bare errors (678 lines for the latter).

- :class:`CheckpointFiles`: ``checkpoint.pt`` written atomically with ``checkpoint.prev.pt`` beside it
  (two generations); the newest readable one chosen to resume from; the user's files never overwritten
  (copied or renamed to ``<name>.<timestamp>.bak``).
- :class:`ModelLoader`: ``model.pt`` into the network at the start of evaluation or inference.
- :class:`BestModelSaver`: ``model.pt`` (with its recipe) at each new best validation metric.

The handler that resumes and stops training is ``custom.engines.training_checkpoint.TrainingCheckpoint``.
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.networks.utils import get_state_dict

from custom.networks.recipe import with_recipe
from custom.networks.weight_files import MODEL_FIX, RESUME_FIX, CheckpointError, read_weights, state_mismatch
from custom.utils import (
    atomic_torch_save,
    atomic_write,
    bare_module,
    is_main_process,
    one_line_reason,
    remove_stale_temporaries,
)

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["CheckpointFiles", "ModelLoader", "BestModelSaver"]

logger = logging.getLogger(__name__)


def _copy_into(src: Path, f: Any) -> None:
    with open(src, "rb") as source:
        shutil.copyfileobj(source, f)


class CheckpointFiles:
    """``<folder>/checkpoint.pt``, its previous generation ``checkpoint.prev.pt``, and the files to keep safe.

    Args:
        path: the checkpoint file (``@ckpt_dir/checkpoint.pt``); the previous generation is
            ``<stem>.prev<suffix>`` beside it.
        protect: names of files in its folder that a fresh start renames aside and a resume without a
            checkpoint copies aside (``checkpoint.pt``, ``model.pt``).
    """

    def __init__(self, path: Path, protect: Sequence[str] = ("checkpoint.pt", "model.pt")) -> None:
        self.path = Path(path)
        self.previous = self.path.with_name(f"{self.path.stem}.prev{self.path.suffix}")
        self.protect = tuple(protect)

    def write(self, state: Mapping[str, Any]) -> None:
        """Save ``state`` atomically; the file it replaces becomes the previous generation."""
        atomic_torch_save(state, self.path, previous=self.previous)

    def remove_stale(self) -> None:
        """Remove the temporary files of saves that were killed (``kill -9``), logging each."""
        for tmp in remove_stale_temporaries(self.path):
            logger.info(f"removed {tmp}, left by a save that was killed")

    def read(self, path: Path) -> dict[str, Any]:
        """The checkpoint's content; an empty, truncated or unsafe file is named with its fix."""
        return read_weights(path, "it cannot be resumed from", RESUME_FIX)

    def choose(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable generation and its content: ``checkpoint.pt``, else ``checkpoint.prev.pt``.

        A damaged ``checkpoint.pt`` with a readable previous generation is kept as
        ``checkpoint.pt.<timestamp>.damaged`` and the previous one is used; None: neither file exists.

        Raises:
            CheckpointError: the newest file is damaged and there is no usable previous generation.
        """
        if not self.path.is_file():
            if not self.previous.is_file():
                return None
            logger.warning(f"no {self.path} but {self.previous} (a save interrupted between its two renames)")
            return self.previous, self.read(self.previous)
        try:
            return self.path, self.read(self.path)
        except CheckpointError as newest:
            if not self.previous.is_file():
                raise
            try:
                ckpt = self.read(self.previous)
            except CheckpointError as older:
                raise CheckpointError(f"{newest} The previous generation cannot be used either: {older}") from None
            kept = self.path.with_name(f"{self.path.name}.{time.strftime('%Y%m%d_%H%M%S')}.damaged")
            if is_main_process():
                os.replace(self.path, kept)
            logger.warning(
                f"{newest} Resuming from the previous checkpoint {self.previous}; the damaged file is {kept}"
            )
            self.keep_copies(f"may be newer than {self.previous.name}, whose best metric this run resumes with")
            return self.previous, ckpt

    def keep_copies(self, reason: str | None = None) -> None:
        """Copy the files of ``protect`` that no checkpoint accounts for to ``.bak``, on rank 0.

        The original stays in place (whatever serves ``model.pt`` keeps finding it) until the run's best
        model replaces it; an identical ``.bak`` already there is not repeated.

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

    def set_aside(self) -> None:
        """``--resume False``: rename the files of ``protect`` and the previous generation to ``.bak``, on rank 0."""
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
    (678 lines). Here each becomes a :class:`~custom.networks.weight_files.CheckpointError` naming the file
    and the value it was trained with (read from the saved ``patch_embed`` shape). Both the plain
    state_dict and the ``{"model": state_dict, "recipe": ...}`` layout load.

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
                    state_mismatch(self.path, "model", bare_module(self.network), state, MODEL_FIX)
                ) from None
            raise CheckpointError(
                f"{self.path}: cannot be loaded into this network ({one_line_reason(e, 200, innermost=False)})."
            ) from None


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
            state = get_state_dict(self.network)
            payload = state if self.state_transform is None else self.state_transform(state)
            atomic_torch_save(with_recipe(payload, self.recipe), self.path)
            logger.info(
                f"saved {self.path}: best {engine.state.key_metric_name} {engine.state.best_metric:.4f} "
                f"at epoch {engine.state.epoch}"
            )
