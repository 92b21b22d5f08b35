"""The common part of the per-case inference outputs (statistics, preview, DICOM SEG): one handler per output.

Each output is an Ignite handler, not a ``postprocessing`` transform, so MONAI Label (which runs a
bundle's ``preprocessing``, ``inferer`` and ``postprocessing`` only) never meets them, and a bundle's
own run gets them after ``SaveImaged``. MONAI has no handler that runs a function per case of an
evaluator's decollated output with per-case failure accounting, hence :class:`CaseOutputHandler`:

- on ``ITERATION_COMPLETED`` it calls :meth:`CaseOutputHandler.write_case` for every item of
  ``engine.state.output`` (the post-processed, decollated items: the prediction on the input's own
  grid after ``Invertd``) whose prediction names its input (``meta["filename_or_obj"]``);
- an item without one is passed by (logged once): nothing to name the output after;
- a case whose output fails is logged with its input and the reason; under
  :class:`custom.data.cases.CaseEvaluator` it is moved from ``written`` to ``failed``, so the run's
  summary lists it and the command exits non-zero after the other cases are done, as for any other
  per-case failure.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from custom.data.inputs import case_name
from custom.utils import class_names_from_metadata, one_line_reason, require_bool

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["CaseOutputHandler", "source_of", "check_enabled", "original_image", "label_volume", "slabs", "as_labels"]

logger = logging.getLogger(__name__)


#: item key naming the key :func:`original_image` loaded into the item (to drop it after the case)
_LOADED = "_outputs_loaded"
#: voxels per slab when a whole volume is reduced (bounds the int64/float64 temporaries at 8 bytes x this)
SLAB_VOXELS = 1 << 24


def label_volume(pred: Any) -> np.ndarray:
    """The ``(X, Y, Z)`` label map of ``pred`` as a numpy view, its dtype kept (no whole-volume copy).

    ``(1, X, Y, Z)`` and ``(X, Y, Z)`` are taken as they are; ``(C, X, Y, Z)`` with C > 1 (one-hot or
    probabilities) is reduced by argmax.

    Raises:
        ValueError: not 3-D after that.
    """
    a = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    if a.ndim == 4:
        a = a[0] if a.shape[0] == 1 else a.argmax(0)
    if a.ndim != 3:
        raise ValueError(f"a label map must be 3-D (optionally with one channel first), got shape {tuple(a.shape)}")
    return a


def as_labels(a: np.ndarray) -> np.ndarray:
    """A (small) part of a label map as int64 class indices (float label maps rounded)."""
    return (np.rint(a) if np.issubdtype(a.dtype, np.floating) else a).astype(np.int64)


def slabs(shape: tuple[int, ...], voxels: int = SLAB_VOXELS) -> list[slice]:
    """Slices along the last axis of a volume of ``shape``, each of at most ``voxels`` voxels (at least one plane)."""
    plane = int(np.prod(shape[:-1])) or 1
    step = max(1, voxels // plane)
    return [slice(z, min(z + step, shape[-1])) for z in range(0, shape[-1], step)]


def check_enabled(enabled: Any, name: str) -> bool:
    """``enabled`` as a bool (the switch ``name``); a string (``--statistics false``) is refused.

    Raises:
        custom.utils.NotABoolError: (a ValueError) ``enabled`` is not a bool.
    """
    return bool(require_bool(enabled, name))


def source_of(value: Any) -> str | None:
    """The input path a (Meta)tensor came from (``meta["filename_or_obj"]``), or None."""
    meta = getattr(value, "meta", None)
    if not isinstance(meta, Mapping):
        return None
    source = meta.get("filename_or_obj")
    if isinstance(source, (list, tuple)):
        source = source[0] if source else None
    return str(source) if isinstance(source, (str, os.PathLike)) and str(source) else None


def original_image(item: dict, batch: Mapping[str, Any], raw_key: str, source: str) -> Any:
    """The input image as loaded (original intensities, its own grid): ``item[raw_key]`` or ``batch[raw_key]``
    when present (``CopyItemsd`` after ``LoadImaged``), else ``source`` read again by MONAI's ``LoadImage``
    (the reader ``LoadImaged`` uses) and kept in ``item[raw_key]`` for the next handler of the same case
    (statistics and preview read the file once). ``(1, X, Y, Z)`` MetaTensor."""
    raw = item.get(raw_key, batch.get(raw_key))
    if raw is None:
        from monai.transforms import LoadImage

        raw = LoadImage(image_only=True, ensure_channel_first=True)(str(source))
        item[raw_key] = raw
        item[_LOADED] = raw_key  # dropped when the next case starts (:meth:`CaseOutputHandler.release`)
    return raw


class CaseOutputHandler:
    """Base handler: :meth:`write_case` per case of the evaluator's output; failures counted per case.

    Args:
        output_dir: where the outputs go (``@output_dir``); created on first write.
        enabled: False attaches nothing (the bundle's ``statistics``/``preview``/``dicom_seg`` switch).
        pred_key: the prediction's key in the post-processed items.
        name: what the output is, for log lines (``statistics``).
        class_names, meta_file: the class names by label value, given, or read from a bundle's metadata.json
            (one of the two).

    Raises:
        ValueError: ``enabled`` is not a bool; neither or both of ``class_names`` and ``meta_file``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        enabled: bool = True,
        pred_key: str = "pred",
        name: str = "output",
        class_names: Sequence[str] | None = None,
        meta_file: str | os.PathLike | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.enabled = check_enabled(enabled, name)
        self.pred_key = pred_key
        self.name = name
        self._warned = False
        if (class_names is None) == (meta_file is None):
            raise ValueError(f"{type(self).__name__} needs class_names or meta_file (one of them)")
        #: the classes by label value, from ``class_names`` or the bundle's ``metadata.json``
        self.class_names = list(class_names) if class_names is not None else class_names_from_metadata(meta_file)

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (nothing when disabled)."""
        from ignite.engine import Events

        if not self.enabled:
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        if not engine.has_event_handler(CaseOutputHandler.release, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, CaseOutputHandler.release)

    @staticmethod
    def release(engine: Engine) -> None:
        """Drop the inputs :func:`original_image` read for the last case, before the next case's inference."""
        outputs = engine.state.output
        for item in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
            if isinstance(item, dict) and _LOADED in item:
                item.pop(item.pop(_LOADED), None)

    def write_case(self, item: Mapping[str, Any], batch: Mapping[str, Any], case: str, source: str) -> None:
        """Write this output for one case. ``item``: the post-processed output; ``batch``: its input item."""
        raise NotImplementedError

    def iteration_completed(self, engine: Engine) -> None:
        outputs = engine.state.output
        if isinstance(outputs, Mapping):
            outputs = [outputs]
        if not isinstance(outputs, (list, tuple)):
            return
        batches = engine.state.batch if isinstance(engine.state.batch, (list, tuple)) else [{}] * len(outputs)
        for item, batch in zip(outputs, list(batches) + [{}] * (len(outputs) - len(batches)), strict=False):
            if not isinstance(item, Mapping) or self.pred_key not in item:
                continue
            source = source_of(item[self.pred_key])
            if source is None:
                if not self._warned:
                    logger.warning(f"{self.name}: the prediction names no input file (no filename_or_obj); not written")
                    self._warned = True
                continue
            try:
                self.write_case(item, batch if isinstance(batch, Mapping) else {}, case_name(source), source)
            except Exception as e:  # this case's output failed; the other cases go on
                self.case_failed(engine, source, e)

    def case_failed(self, engine: Engine, source: str, error: BaseException) -> None:
        """Log a failed output; under ``CaseEvaluator`` move the case from ``written`` to ``failed``."""
        text = f"{source}: {self.name} failed: {one_line_reason(error)}"
        logger.error(f"case failed: {text}")
        failed, written = getattr(engine, "failed", None), getattr(engine, "written", None)
        if isinstance(failed, list):
            failed.append(text)
        if isinstance(written, list) and source in written:
            written.remove(source)
