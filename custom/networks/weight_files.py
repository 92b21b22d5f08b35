"""Reading a weight or checkpoint file, and saying in one line why it cannot be used or does not fit a network.

``torch.load`` answers an empty file with ``EOFError``, a truncated one with "failed finding central
directory", and ``load_state_dict`` answers weights of another ``feature_size`` with a dump of every
mismatching tensor (678 lines). Here each becomes a :class:`CheckpointError` that names the file and the fix.
Everything that reads weights goes through :func:`read_weights`: the recipe (``custom.networks.recipe``),
resuming (``custom.engines.training_checkpoint``), ``model.pt`` loading and ensembles. Writing is
``custom.utils.atomic_torch_save``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from custom.utils import one_line_reason

__all__ = ["CheckpointError", "read_weights", "state_mismatch", "RESUME_FIX", "MODEL_FIX"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume; the message names the file and the fix."""


#: what to do about weights that do not fit, when resuming (checkpoint.pt) and when loading model.pt
RESUME_FIX = "or --resume False to start over (the checkpoint is then kept as a .bak file)"
MODEL_FIX = "or point --ckpt_dir at the weights trained with this config"


def state_mismatch(
    path: Path, name: str, network: torch.nn.Module, saved: Mapping[str, Any], fix: str = RESUME_FIX
) -> str:
    """One line on why ``saved`` does not fit ``network``: the feature_size it was trained with, when that is it.

    A Swin UNETR's (and the SSL head's) ``patch_embed.proj.weight`` has ``feature_size`` output channels,
    so the saved value is read from that tensor's shape instead of PyTorch's dump of every mismatch.

    Args:
        path: the file ``saved`` was read from (named in the message).
        name: what ``saved`` is in that file (``"model"``).
        network: the network it was to be loaded into (unwrapped from DDP).
        saved: its state_dict.
        fix: the end of the message: what to do instead (:data:`RESUME_FIX`, :data:`MODEL_FIX`, ...).
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


def read_weights(path: Path, use: str = "no segmentation can be made with it", fix: str = MODEL_FIX) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; an empty, truncated or unsafe file is named in one line with ``fix``.

    Raises:
        CheckpointError: the file cannot be read, or holds something other than a mapping.
    """
    size = path.stat().st_size
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path}: refused to load, it holds objects other than tensors and plain values (Weights only load "
                f"failed: {one_line_reason(e, 200, innermost=False)}). Not a file of this bundle; "
                f"{fix.removeprefix('or ')}."
            ) from None
        reason = one_line_reason(e, 160, innermost=False)
        what = "empty (0 bytes)" if size == 0 else f"truncated or damaged ({size} bytes; {reason})"
        raise CheckpointError(
            f"{path} is {what}: {use} (an interrupted copy or a full disk?). Put back a complete copy, {fix}."
        ) from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(ckpt).__name__}, not weights of this bundle; {fix.removeprefix('or ')}."
        )
    return dict(ckpt)
