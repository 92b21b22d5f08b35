"""Training data that fails loudly: a case that cannot be loaded stops the run, named.

Two gaps in MONAI 1.6.1 let a training run with an unreadable case look finished:

- ``ThreadDataLoader`` runs the data loader in a background thread (``monai.data.ThreadBuffer``);
  an exception there ends that thread (Python prints its traceback) and the main thread only sees
  the data run out. ignite then restarts the loader and, when it runs out again at once, ends the
  run quietly: exit status 0, fewer iterations than asked, the failing case never trained on.
  :class:`CheckedThreadDataLoader` hands the exception over to the main thread instead.
- ``CacheDataset`` (and MONAI's transforms) report a reader's error as "applying transform
  <LoadImaged object at 0x...>" over a bare ``EOFError`` or ITK error that does not name the file;
  while the cache is filled the error is wrapped once more by the config parser ("Failed to
  instantiate component"). :class:`CheckedCacheDataset` raises :class:`CaseLoadError`, one line
  naming the file, the datalist section and the reason, and logs it where the run's log is read.

Neither skips the case: a training set silently missing a case is what this module prevents. The
preflight check (``custom.data.preflight.DataCheck``, on by default) finds most such files before the first
step; this is the net for what it cannot see, or for ``--preflight False``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from monai.data import CacheDataset, DataLoader, ThreadBuffer, ThreadDataLoader

from custom.utils import one_line_reason

__all__ = ["CaseLoadError", "CheckedCacheDataset", "CheckedThreadDataLoader"]

logger = logging.getLogger(__name__)

_TRANSFORM = re.compile(r"applying transform <([\w.]+) object")


class CaseLoadError(RuntimeError):
    """A case of the datalist could not be loaded or preprocessed; the message names its file."""


def _failed_transform(error: BaseException) -> str | None:
    """Class name of the MONAI transform that raised (from its "applying transform <...>" wrapper)."""
    names = []
    while error is not None:
        match = _TRANSFORM.search(str(error))
        if match:
            names.append(match.group(1).rsplit(".", 1)[-1])
        error = error.__cause__ or error.__context__
    return names[-1] if names else None  # the innermost: a Compose inside a Compose wraps twice


def _files(item: Any) -> dict[str, str]:
    """key -> path of the item's entries that name an existing file or folder."""
    if not isinstance(item, Mapping):
        return {}
    return {k: str(v) for k, v in item.items() if isinstance(v, (str, os.PathLike)) and os.path.exists(v)}


def _unreadable(path: str) -> str | None:
    """Why MONAI's default ``LoadImage`` cannot read ``path`` alone, or None when it can."""
    from monai.transforms import LoadImage

    try:
        LoadImage(image_only=True)(path)
    except Exception as e:  # readers raise many types for corrupt or truncated files
        return one_line_reason(e)
    return None


class CheckedCacheDataset(CacheDataset):
    """``monai.data.CacheDataset`` whose failures name the case: :class:`CaseLoadError` instead of a bare trace.

    When a transform fails on an item (while the cache is filled, or at an iteration), the error
    names the datalist section, the case's position, its files and the reason. A failure in
    ``LoadImaged`` is traced to the one file that the default loader cannot read alone (one more read,
    only after a failure), so the message says which file to replace.

    Args:
        data, transform, cache_rate, num_workers, ...: as ``monai.data.CacheDataset``.
        section: the datalist section these items come from (``"training"``, ``"validation"``), for
            the message.
        **kwargs: other ``CacheDataset`` arguments.

    Raises:
        CaseLoadError: a case failed to load or to pass its transforms; chained to the original error.
    """

    def __init__(self, data: Any, transform: Any = None, section: str = "", **kwargs: Any) -> None:
        self.section = section
        super().__init__(data, transform, **kwargs)

    def _failure(self, index: int, error: BaseException) -> CaseLoadError:
        item = self.data[index]
        files = _files(item)
        where = f"{self.section + ' ' if self.section else ''}case {index + 1} of {len(self.data)}"
        transform = _failed_transform(error)
        culprit = None
        if transform is not None and transform.startswith("LoadImage"):
            for path in files.values():
                why = _unreadable(path)
                if why is not None:
                    culprit = (path, why)
                    break
        if culprit is not None:
            head = f"{culprit[0]}: cannot be read ({culprit[1]})"
        else:
            listed = ", ".join(f"{k} {v}" for k, v in files.items()) or repr(item)[:200]
            step = f" in {transform}" if transform else ""
            head = f"{listed}: failed{step} ({one_line_reason(error)})"
        return CaseLoadError(
            f"{head}; {where} of the datalist. The run stops here: replace the file or remove the case from the "
            "datalist (`run check_data` checks every case)."
        )

    def _load_cache_item(self, idx: int) -> Any:
        try:
            return super()._load_cache_item(idx)
        except CaseLoadError:
            raise
        except Exception as e:
            error = self._failure(idx, e)
            logger.error(str(error))  # while caching the config parser buries it under "Failed to instantiate"
            raise error from e

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except CaseLoadError:
            raise
        except Exception as e:
            raise self._failure(index % len(self.data), e) from e


class _RaisingThreadBuffer(ThreadBuffer):
    """``ThreadBuffer`` that re-raises, in the consuming thread, what ended its background thread."""

    def enqueue_values(self) -> None:
        try:
            super().enqueue_values()
        except Exception as e:  # handed to __iter__, which raises it where the trainer runs
            self.error = e

    def __iter__(self) -> Iterator[Any]:
        self.error: Exception | None = None
        yield from super().__iter__()
        if self.error is not None:
            raise self.error


class CheckedThreadDataLoader(ThreadDataLoader):
    """``monai.data.ThreadDataLoader`` that raises a data error instead of ending the epoch early.

    MONAI's version loses an exception of its background thread: the epoch just ends (see the module
    docstring). Same arguments and batches as ``ThreadDataLoader``; the background thread's
    exception (e.g. :class:`CaseLoadError`) is raised in the trainer's thread after the batches made
    before it.
    """

    def __iter__(self) -> Iterator[Any]:
        buffer = _RaisingThreadBuffer(DataLoader.__iter__(self), self.buffer_size, self.buffer_timeout)
        for batch in buffer:
            for _ in range(self.repeats):
                yield batch
