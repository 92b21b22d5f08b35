"""Inference over a folder where one bad case costs that case only, and every case is accounted for.

MONAI's ``Dataset`` lets a load error escape into the data loader (a ``ThreadDataLoader`` then logs it
in its background thread and the run ends with exit status 0, some cases never written), and
``SaveImaged`` replaces any file of the output's name. MONAI has no per-case failure handling for a
``SupervisedEvaluator``, hence:

- :func:`plan_cases`: the inputs of ``input_dir``, each marked to skip when its output exists already
  (unless ``overwrite``), after checking that ``output_dir`` can take the outputs;
- :class:`CaseDataset`: a ``monai.data.Dataset`` whose items come back as a marker naming the file and the
  reason when loading or preprocessing fails (DICOM series are checked first, see
  :func:`custom.data.inputs.dicom_series_problem`); markers travel through worker processes and collation;
- :class:`CaseEvaluator`: a ``SupervisedEvaluator`` that passes markers by, also records a case whose
  inference or saving fails, and ends with one summary: written, skipped, failed. Any failure raises
  :class:`CaseFailures` after all other cases are done, so the command exits non-zero.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from monai.data import Dataset
from monai.engines import SupervisedEvaluator

from custom.data.inputs import case_name, checked_output_dir, dicom_series_problem, list_images
from custom.utils import one_line_reason, require_bool

__all__ = ["FAILED", "SKIPPED", "CaseFailures", "plan_cases", "CaseDataset", "CaseEvaluator"]

logger = logging.getLogger(__name__)

#: item key of a case that could not be loaded: the reason, one line
FAILED = "case_failed"
#: item key of a case not segmented because its output exists (``overwrite`` false): that output
SKIPPED = "case_skipped"


class CaseFailures(RuntimeError):
    """Some cases failed; the message lists each with its file and reason (the others were written)."""


def plan_cases(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    output_postfix: str = "seg",
    output_ext: str = ".nii.gz",
) -> list[dict]:
    """Every input of ``input_dir`` (:func:`custom.data.inputs.list_images`); those whose output exists marked skipped.

    Args:
        input_dir: the folder to segment.
        output_dir: where ``SaveImaged`` writes ``<case>_<output_postfix><output_ext>``
            (:func:`custom.data.inputs.case_name`); checked by :func:`custom.data.inputs.checked_output_dir`.
        overwrite: replace existing outputs; False (default) keeps them and skips their input.
        output_postfix: ``SaveImaged``'s ``output_postfix``.
        output_ext: ``SaveImaged``'s ``output_ext``.

    Raises:
        ValueError: ``overwrite`` is not a bool (``--overwrite true`` arrives as a string), or
            ``output_dir`` cannot take the outputs.
    """
    require_bool(overwrite, "overwrite")
    checked_output_dir(output_dir, input_dir)
    items = list_images(input_dir)
    for item in items:
        out = Path(output_dir) / f"{case_name(item['image'])}_{output_postfix}{output_ext}"
        if out.exists() and not overwrite:
            item[SKIPPED] = str(out)
            logger.warning(f"{item['image']}: skipped, its output {out} exists (--overwrite True replaces it)")
    return items


class CaseDataset(Dataset):
    """``monai.data.Dataset`` returning ``{"image": path, FAILED: reason}`` for an item that fails to load.

    A skipped item (:data:`SKIPPED`) is returned as it is, unread. A DICOM folder is checked first by
    :func:`custom.data.inputs.dicom_series_problem`.

    Args:
        data: items as :func:`plan_cases` returns them.
        transform: the preprocessing.
        accept_uneven_slices: read unevenly spaced DICOM series instead of refusing them.
    """

    def __init__(self, data: Sequence[dict], transform: Callable | None = None, accept_uneven_slices: bool = False):
        require_bool(accept_uneven_slices, "accept_uneven_slices")
        super().__init__(data, transform)
        self.accept_uneven_slices = accept_uneven_slices

    def _transform(self, index: int):
        item = self.data[index]
        if SKIPPED in item:
            return dict(item)
        try:
            if os.path.isdir(item["image"]):
                problem = dicom_series_problem(item["image"], self.accept_uneven_slices)
                if problem:
                    return {"image": item["image"], FAILED: problem}
            return super()._transform(index)
        except Exception as e:  # any reader or transform error: this case fails, the others go on
            return {"image": item["image"], FAILED: f"{item['image']}: {one_line_reason(e)}"}


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


class CaseEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` over :class:`CaseDataset` batches of one case: each case written, skipped or failed.

    Overrides only ``_iteration`` (markers and per-case errors) and ``run`` (the summary). A case whose
    inference, post-processing or saving raises is recorded and the run goes on. After the run, one log
    line per failed case and a count; :class:`CaseFailures` if any failed.

    Same arguments as ``SupervisedEvaluator``; ``val_data_loader`` must give batches of one case.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written: list[str] = []
        self.skipped: list[str] = []
        self.failed: list[str] = []

    def _iteration(self, engine, batchdata):
        if isinstance(batchdata, dict) and SKIPPED in batchdata:
            self.skipped.append(f"{_first(batchdata['image'])} (output {_first(batchdata[SKIPPED])} kept)")
            return []
        if isinstance(batchdata, dict) and FAILED in batchdata:
            text = str(_first(batchdata[FAILED]))
            logger.error(f"case failed: {text}")
            self.failed.append(text)
            return []
        image = batchdata.get("image") if isinstance(batchdata, dict) else None
        source = _first(getattr(image, "meta", {}).get("filename_or_obj", "case"))
        try:
            output = super()._iteration(engine, batchdata)
        except Exception as e:  # inference, post-processing or saving of this case failed
            text = f"{source}: {one_line_reason(e)}"
            logger.error(f"case failed: {text}")
            self.failed.append(text)
            engine.state.output = []
            return []
        self.written.append(str(source))
        return output

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        """Run over every case, then log the summary.

        Raises:
            CaseFailures: at least one case failed (each is listed); every other case was written.
        """
        self.written, self.skipped, self.failed = [], [], []
        super().run(global_epoch)
        total = len(self.written) + len(self.skipped) + len(self.failed)
        summary = (
            f"inference summary: {total} case(s): {len(self.written)} written, {len(self.skipped)} skipped "
            f"(output exists), {len(self.failed)} failed"
        )
        lines = [f"  skipped: {s}" for s in self.skipped] + [f"  FAILED: {f}" for f in self.failed]
        text = "\n".join([summary, *lines])
        (logger.error if self.failed else logger.info)(text)
        if self.failed:
            raise CaseFailures(text)
