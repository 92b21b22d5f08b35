"""Cross-validation folds written once to a splits file and read back on every later run.

A fold must mean the same cases forever, on every machine and every rank, or the cross-validation
summary mixes models that saw each other's validation cases. nnU-Net writes ``splits_final.json``
(a list of ``{"train": [...], "val": [...]}``) once and reads it back; this module does the same with
the cases of a datalist, and adds a fingerprint of the case list so that a datalist that changed later
(cases added or removed) is refused by name instead of silently re-split.

Why not MONAI's ``partition_dataset``: it splits a list in memory (shuffled with a seed, or in order);
it neither writes the split nor notices that the list changed between runs, which is the point here.

The default split is round robin over the case identifiers sorted by name: case ``i`` is held out in
fold ``i % num_folds``. It needs no random generator (the same on every Python and NumPy version), and
it is the rule ``custom.segmentation.msd.msd_datalist`` has always used, so an MSD fold trained before
the splits file existed holds out the same cases. A splits file edited by hand (nnU-Net users do this for
custom splits) is used as it is, once checked: same cases as the datalist, folds disjoint and covering.

File layout (JSON, 4-space indent)::

    {"format": 1, "num_folds": 5, "fingerprint": "<sha256 of the sorted case identifiers>",
     "cases": 30, "splits": [{"train": ["imagesTr/img0002.nii.gz", ...], "val": [...]}, ...]}

A case identifier is the item's ``image`` path relative to ``dataset_dir`` (``./`` removed), or as given
when it lies outside ``dataset_dir`` or no ``dataset_dir`` is given; for a list of images, the first.

Rank safety: only the main process (rank 0, :func:`custom.utils.is_main_process` and the ``RANK``
variable torchrun sets) writes the file, atomically (:func:`custom.utils.atomic_write`). Every other
rank reads the file when it exists and verifies it like rank 0 does, or, when rank 0 has not written it
yet, computes the same split itself (the rule is deterministic), so no rank waits on another. Folds
trained at the same time by separate jobs (one per GPU, as nnU-Net users do) may both find no file and
both write it: the content is the same, and the rename is atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from custom.utils import atomic_write, is_main_process

__all__ = [
    "SPLITS_FORMAT",
    "SplitsError",
    "case_id",
    "fingerprint",
    "round_robin_splits",
    "load_or_create_splits",
    "fold_datalist",
    "decathlon_cases",
    "decathlon_fold_datalist",
    "fold_ckpt_dir",
    "fold_weight_files",
]

SPLITS_FORMAT = 1
_SECTIONS = {"training": "train", "validation": "val"}


class SplitsError(ValueError):
    """The splits file does not fit the datalist (or is damaged); the message names the file and the fix."""


def case_id(item: Mapping[str, Any], dataset_dir: str | os.PathLike | None = None) -> str:
    """The identifier of a datalist item: its ``image`` path relative to ``dataset_dir``.

    >>> case_id({"image": "/data/btcv/imagesTr/img0001.nii.gz"}, "/data/btcv")
    'imagesTr/img0001.nii.gz'
    >>> case_id({"image": "./imagesTr/spleen_2.nii.gz"})
    'imagesTr/spleen_2.nii.gz'

    Raises:
        SplitsError: the item has no ``image``.
    """
    image = item.get("image") if isinstance(item, Mapping) else None
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
    if image is None:
        raise SplitsError(f"a datalist item without an 'image' entry cannot be assigned to a fold: {item!r}")
    path = str(image)
    if dataset_dir is not None:
        try:
            path = os.path.relpath(os.path.abspath(path), os.path.abspath(dataset_dir))
        except ValueError:  # another drive (Windows)
            pass
        if path.startswith(".."):
            path = str(image)
    path = path.replace(os.sep, "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def fingerprint(ids: Sequence[str]) -> str:
    """sha256 of the sorted identifiers, one per line: the same set of cases gives the same value."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def round_robin_splits(ids: Sequence[str], num_folds: int) -> list[dict[str, list[str]]]:
    """``num_folds`` splits of ``ids``: sorted by name, case ``i`` is held out in fold ``i % num_folds``.

    >>> round_robin_splits(["c", "a", "b"], 2)
    [{'train': ['b'], 'val': ['a', 'c']}, {'train': ['a', 'c'], 'val': ['b']}]

    Raises:
        SplitsError: ``num_folds`` below 2, no cases, or duplicate identifiers. With fewer cases than folds
            the last folds hold out nothing (:func:`fold_datalist` refuses to train such a fold).
    """
    _check_ids(ids, num_folds)
    ordered = sorted(ids)
    return [
        {
            "train": [c for i, c in enumerate(ordered) if i % num_folds != f],
            "val": [c for i, c in enumerate(ordered) if i % num_folds == f],
        }
        for f in range(num_folds)
    ]


def _check_ids(ids: Sequence[str], num_folds: int) -> None:
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise SplitsError(f"num_folds must be an integer of at least 2, got {num_folds!r}")
    if not ids:
        raise SplitsError("the datalist has no cases to split into folds")
    dupes = sorted(c for c, n in Counter(ids).items() if n > 1)
    if dupes:
        raise SplitsError(f"the datalist lists {len(dupes)} case(s) twice (first: {dupes[0]}); a case is in one fold")


def _is_writer() -> bool:
    """Rank 0 of a torchrun job (also before the process group is set up), or a plain process."""
    return is_main_process() and int(os.environ.get("RANK", "0") or 0) == 0


def _differences(path: Path, saved: set[str], current: set[str]) -> str:
    added, removed = sorted(current - saved), sorted(saved - current)

    def few(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    parts = [f"{len(added)} case(s) not in the file ({few(added)})"] if added else []
    parts += [f"{len(removed)} case(s) of the file missing from the datalist ({few(removed)})"] if removed else []
    return (
        f"{path}: the datalist's cases differ from the cases this splits file was written for: {'; '.join(parts)}. "
        "A fold must hold out the same cases in every run, so nothing was re-split. Either restore the datalist, "
        f"or delete {path} to split the new case list (folds trained so far then no longer match their held-out "
        "cases: retrain them), or point splits_file at a new path (and ckpt_dir at a new folder)"
    )


def _verify(path: Path, saved: Any, ids: Sequence[str], num_folds: int) -> list[dict[str, list[str]]]:
    """The splits of a file read back, checked against the datalist's ``ids``."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("splits"), list):
        raise SplitsError(
            f"{path}: not a splits file of this bundle (expected a JSON object with 'splits': a list of "
            "{'train': [...], 'val': [...]}); delete it or point splits_file elsewhere"
        )
    splits = saved["splits"]
    if len(splits) != num_folds:
        raise SplitsError(
            f"{path}: holds {len(splits)} folds but num_folds is {num_folds}; use --num_folds {len(splits)}, "
            "or a new splits_file (and ckpt_dir) for another number of folds"
        )
    for f, split in enumerate(splits):
        if not (
            isinstance(split, Mapping) and isinstance(split.get("train"), list) and isinstance(split.get("val"), list)
        ):
            raise SplitsError(f"{path}: fold {f} is not {{'train': [...], 'val': [...]}}")
    current, saved_cases = set(ids), set(splits[0]["train"]) | set(splits[0]["val"])
    if saved_cases != current:
        raise SplitsError(_differences(path, saved_cases, current))
    vals = [c for split in splits for c in split["val"]]
    if len(vals) != len(set(vals)) or set(vals) != current:
        raise SplitsError(f"{path}: the folds' 'val' lists must hold every case exactly once (a hand edit?)")
    for f, split in enumerate(splits):
        if set(split["train"]) != current - set(split["val"]) or len(split["train"]) != len(set(split["train"])):
            raise SplitsError(f"{path}: fold {f}'s 'train' must be every case not in its 'val', each once")
    return [{"train": list(s["train"]), "val": list(s["val"])} for s in splits]


def load_or_create_splits(
    ids: Sequence[str], splits_file: str | os.PathLike, num_folds: int
) -> list[dict[str, list[str]]]:
    """The splits of ``splits_file``, written there first (rank 0 only) when it does not exist yet.

    Args:
        ids: every case identifier of the datalist (see :func:`case_id`).
        splits_file: the JSON file; kept beside the folds' checkpoints (``@ckpt_dir/splits_final.json``).
        num_folds: the number of folds (2 or more).

    Raises:
        SplitsError: the file holds other cases (added or removed ones are named), another number of
            folds, or is not a splits file; too few or duplicate cases.
    """
    _check_ids(ids, num_folds)
    path = Path(splits_file)
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SplitsError(f"{path}: cannot be read as JSON ({e}); delete it to split again") from None
        return _verify(path, saved, ids, num_folds)
    splits = round_robin_splits(ids, num_folds)
    if _is_writer():
        content = {
            "format": SPLITS_FORMAT,
            "num_folds": num_folds,
            "fingerprint": fingerprint(ids),
            "cases": len(ids),
            "splits": splits,
        }
        atomic_write(path, lambda f: f.write(json.dumps(content, indent=4) + "\n"), mode="w")
    return splits


def fold_datalist(
    cases: Sequence[Mapping[str, Any]],
    splits_file: str | os.PathLike,
    num_folds: int,
    fold: int,
    section: str = "training",
    dataset_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """The training or validation cases of ``fold``, by the splits file (written on first use).

    Args:
        cases: every labelled case of the datalist (dicts with ``image``, ``label``, ...), any order.
        splits_file: where the split is kept (see :func:`load_or_create_splits`).
        num_folds: number of folds.
        fold: the held-out fold, ``0 .. num_folds - 1``.
        section: ``"training"`` (every other fold) or ``"validation"`` (the held-out fold).
        dataset_dir: the folder identifiers are relative to (see :func:`case_id`).

    Returns:
        the items of ``cases`` in that part, in the splits file's order, unchanged (paths as given).

    Raises:
        SplitsError: see :func:`load_or_create_splits`; ``fold`` out of range; unknown ``section``.
    """
    if section not in _SECTIONS:
        raise SplitsError(f"section must be 'training' or 'validation', got {section!r}")
    ids = [case_id(item, dataset_dir) for item in cases]
    _check_ids(ids, num_folds)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise SplitsError(f"fold must be an integer in 0..{num_folds - 1} (num_folds {num_folds}), got {fold!r}")
    by_id = dict(zip(ids, cases, strict=True))
    splits = load_or_create_splits(ids, splits_file, num_folds)
    if not splits[fold]["val"]:
        raise SplitsError(
            f"{splits_file}: fold {fold} holds out no case ({len(ids)} cases in {num_folds} folds): "
            f"use at most {len(ids)} folds"
        )
    return [dict(by_id[c]) for c in splits[fold][_SECTIONS[section]]]


def decathlon_cases(
    datalist: str | os.PathLike, dataset_dir: str | os.PathLike, pool: Sequence[str] = ("training", "validation")
) -> list[dict]:
    """Every labelled case of a decathlon-style datalist: the sections of ``pool`` present in it, paths absolute.

    A case listed in two sections with the same entries counts once.

    Raises:
        SplitsError: the datalist cannot be read, none of ``pool`` is in it, or one image is listed twice
            with different entries.
    """
    from monai.data import load_decathlon_datalist

    try:
        content = json.loads(Path(datalist).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SplitsError(f"{datalist}: cannot be read as a JSON datalist ({e})") from None
    present = [name for name in pool if name in content]
    if not present:
        raise SplitsError(f"{datalist}: none of the sections {list(pool)} to split into folds")
    cases: dict[str, dict] = {}
    for name in present:
        for item in load_decathlon_datalist(str(datalist), True, name, base_dir=str(dataset_dir)):
            key = case_id(item, dataset_dir)
            if key in cases and cases[key] != item:
                raise SplitsError(f"{datalist}: {key} is listed twice with different entries ({cases[key]} and {item})")
            cases[key] = item  # listed in two sections (the sample's training and validation): one case
    return list(cases.values())


def decathlon_fold_datalist(
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    section: str = "training",
    num_folds: int = 5,
    fold: int | None = None,
    splits_file: str | os.PathLike | None = None,
    pool: Sequence[str] = ("training", "validation"),
) -> list[dict]:
    """A decathlon-style datalist's ``section``, or, with ``fold`` set, that fold of its labelled cases.

    With ``fold=None`` this is ``monai.data.load_decathlon_datalist(datalist, True, section, dataset_dir)``:
    BTCV's published 24/6 split (``dataset_0.json``) stays what it is. With ``fold`` set, the cases of
    every section in ``pool`` that exists in the file are pooled (:func:`decathlon_cases`) and split by
    :func:`fold_datalist`.

    Raises:
        SplitsError: ``fold`` set without ``splits_file``; see :func:`fold_datalist`.
    """
    from monai.data import load_decathlon_datalist

    if fold is None:
        return load_decathlon_datalist(str(datalist), True, section, base_dir=str(dataset_dir))
    if splits_file is None:
        raise SplitsError("fold is set but splits_file is not: the split must be kept in a file (splits_file)")
    return fold_datalist(
        decathlon_cases(datalist, dataset_dir, pool), splits_file, num_folds, fold, section, dataset_dir
    )


def fold_ckpt_dir(ckpt_dir: str | os.PathLike, fold: int | None) -> str:
    """``ckpt_dir/fold_<fold>`` with a fold set, ``ckpt_dir`` itself without (so folds never resume each other).

    >>> fold_ckpt_dir("models", 2), fold_ckpt_dir("models", None)
    ('models/fold_2', 'models')

    Raises:
        SplitsError: ``fold`` is neither None nor a non-negative integer (``--fold none`` arrives as a string).
    """
    if fold is None:
        return str(ckpt_dir)
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
        raise SplitsError(f"fold must be None or an integer 0..num_folds-1, got {fold!r} (write --fold None, not null)")
    return str(Path(ckpt_dir) / f"fold_{fold}")


def fold_weight_files(ckpt_dir: str | os.PathLike, num_folds: int, name: str = "model.pt") -> list[str]:
    """``[ckpt_dir/fold_0/model.pt, ..., ckpt_dir/fold_<K-1>/model.pt]``: the ensemble of a trained set of folds.

    >>> fold_weight_files("models", 2)
    ['models/fold_0/model.pt', 'models/fold_1/model.pt']

    Raises:
        SplitsError: ``num_folds`` is not an integer of at least 2.
    """
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise SplitsError(f"num_folds must be an integer of at least 2, got {num_folds!r}")
    return [str(Path(fold_ckpt_dir(ckpt_dir, f)) / name) for f in range(num_folds)]
