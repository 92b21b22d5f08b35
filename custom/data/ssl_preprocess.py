"""Data for self-supervised pre-training, prepared once: the preprocessed corpus, built, sharded and merged.

    python -m custom.tools.ssl_corpus --datalist a.json b.json --dataset_dir /data --out_dir /data/ssl_corpus --workers 8
    python -m custom.tools.ssl_corpus ... --shard 3/16     # one of 16 array jobs or nodes; then, once:
    python -m custom.tools.ssl_corpus --out_dir /data/ssl_corpus --merge

The paper (Tang et al., CVPR 2022) pre-trains on 5,050 unlabeled CTs. Its code (research-contributions
``SwinUNETR/Pretrain/utils/data_utils.py``) loads each NIfTI, reorients it to RAS, windows it
(``ScaleIntensityRanged`` -1000..1000 HU to 0..1, clipped), pads to the 96^3 ROI, crops the
foreground, then draws random 96^3 crops, for every item (plain ``Dataset``, its default) or from
a RAM cache (``CacheDataset``). Decoded per item, NIfTI decoding (gzip) is the bottleneck; cached,
RAM grows with the corpus (hundreds of GB for 5,050 CTs). Here the deterministic part runs once:
:func:`preprocess_corpus` stores each result as a ``.npy`` (uint8 by default: 1/255 of the 2000 HU
window is about 8 HU), and :class:`~custom.data.ssl_dataset.MemmapCropDataset` reads only the voxels of
each crop through ``np.load(mmap_mode="r")``, so RAM stays flat however large the corpus grows and crops
per second are bound by the disk. Unlike the paper's code, the foreground box is not rounded up to a multiple
of the ROI (``k_divisible``): that would only add background around the body.

Layout of ``out_dir``::

    index.json          settings, and per volume: file, source, section, shape
    volumes/<name>.npy  channel-first (1, X, Y, Z), RAS, uint8 round(x * 255) or float16 x, x in 0..1
    parts/shard-i-of-n.json  part index of shard i of n (``--shard i/n``), merged into index.json by ``--merge``

The dataset that reads it at training time, and the corpus format, are in ``custom.data.ssl_dataset``.
``python -m custom.tools.ssl_corpus`` is the command line over :func:`preprocess_corpus` and :func:`merge_corpus`.

Each ``.npy`` is written atomically, under a name made from its source path and the settings, so a
killed run resumes where it stopped and a file on disk is always complete and of this index's settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom.data.inputs import IMAGE_SUFFIXES, read_datalist
from custom.data.ssl_dataset import DTYPES, FORMAT_VERSION, read_corpus_index
from custom.utils import atomic_write, one_line_reason

__all__ = ["CorpusError", "load_ssl_datalists", "preprocess_corpus", "merge_corpus", "Corpus"]

logger = logging.getLogger(__name__)

#: the volume files LoadImage reads, and NumPy arrays
_IMAGE_SUFFIXES = IMAGE_SUFFIXES + (".npy", ".npz")


class CorpusError(ValueError):
    """Some images could not be stored; the message lists each file and its problem."""


# -- datalists ------------------------------------------------------------------------------------
def _read_datalist(path: str | os.PathLike, dataset_dir: str | os.PathLike, section: str) -> list[str]:
    """Full image paths of one section of one decathlon-style datalist (empty if the section is absent)."""
    items = read_datalist(path, section).get(section, [])
    if not isinstance(items, list):
        raise ValueError(f"{path}: {section!r} must be a list, got {type(items).__name__}")
    images = []
    for i, item in enumerate(items):
        rel = item.get("image") if isinstance(item, dict) else item
        if not isinstance(rel, str) or not rel:
            raise ValueError(f"{path}: {section}[{i}] must be an image path or a dict with an 'image', got {item!r}")
        rel = os.path.expanduser(rel)
        images.append(os.path.normpath(rel if os.path.isabs(rel) else os.path.join(dataset_dir, rel)))
    return images


def _as_list(datalists: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    if isinstance(datalists, (str, os.PathLike)):
        return [datalists]
    datalists = list(datalists)
    if not datalists:
        raise ValueError("no datalist given")
    return datalists


def load_ssl_datalists(
    datalists: str | os.PathLike | Sequence[str | os.PathLike],
    dataset_dir: str | os.PathLike,
    section: str = "training",
) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` from one section of one or more decathlon-style datalists, in order.

    Pre-training uses images only: a ``"label"`` (and any other key) is dropped, and an entry may be
    a plain path string. Relative paths are joined to ``dataset_dir``. A file without ``section``
    contributes nothing; MONAI's ``load_decathlon_datalist`` would refuse it and wants one file.

    Args:
        datalists: path of a datalist JSON, or a list of them.
        dataset_dir: folder that relative image paths start from.
        section: the list to read from each file (``"training"``, ``"validation"``, ...).

    Raises:
        FileNotFoundError: a datalist does not exist.
        ValueError: a datalist is not valid JSON, has a malformed entry, or no file has any image in ``section``.
    """
    datalists = _as_list(datalists)
    images = [img for dl in datalists for img in _read_datalist(dl, dataset_dir, section)]
    if not images:
        raise ValueError(f"no image in section {section!r} of {', '.join(str(d) for d in datalists)}")
    return [{"image": img} for img in images]


# -- preprocessing --------------------------------------------------------------------------------
def _settings(
    pixdim: float | Sequence[float] | None,
    intensity_range: Sequence[float],
    roi_size: Sequence[int],
    dtype: str,
) -> dict[str, Any]:
    """The checked, JSON-normal settings an index records."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if pixdim is not None:
        pixdim = [float(pixdim)] * 3 if isinstance(pixdim, (int, float)) else [float(p) for p in pixdim]
        if len(pixdim) != 3 or not all(math.isfinite(p) and p > 0 for p in pixdim):
            raise ValueError(f"pixdim must be None or 3 positive spacings in mm, got {pixdim}")
    rng = [float(v) for v in intensity_range]
    if len(rng) != 2 or not all(math.isfinite(v) for v in rng) or rng[0] >= rng[1]:
        raise ValueError(f"intensity_range must be (low, high) with low < high, got {list(intensity_range)}")
    roi = [int(r) for r in roi_size]
    if len(roi) != 3 or any(r < 1 for r in roi) or any(r != v for r, v in zip(roi, roi_size, strict=True)):
        raise ValueError(f"roi_size must be 3 positive integers, got {list(roi_size)}")
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "scale": DTYPES[dtype][1],
        "intensity_range": rng,
        "pixdim": pixdim,
        "roi_size": roi,
    }


def _stored_name(source: str, settings: dict[str, Any]) -> str:
    """File name for ``source``: its readable stem plus a hash of its full path and the settings.

    The hash keeps same-named files of different folders apart and ties a file to its settings, so
    a resumed run never takes a file made with other settings for its own.

    >>> name = _stored_name("/data/imagesTr/case 01.nii.gz", {"dtype": "uint8"})
    >>> name.startswith("case_01_") and name.endswith(".npy") and len(name) == len("case_01_") + 12 + 4
    True
    """
    base = os.path.basename(os.path.normpath(source))
    for suffix in _IMAGE_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "volume"
    key = json.dumps([os.path.abspath(source), settings], sort_keys=True)
    return f"{base[:80]}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npy"


def _chains(settings: dict[str, Any]) -> tuple[list, list]:
    """MONAI transforms: load -> RAS -> [spacing] -> window to 0..1, and foreground crop -> pad to the ROI.

    Plain lists applied in turn, not ``Compose``: ``Compose`` wraps every error in "applying transform
    <...>", and the per-file report should say what is wrong with the file (truncated gzip, not found).
    """
    from monai.transforms import CropForeground, LoadImage, Orientation, ScaleIntensityRange, Spacing, SpatialPad
    from monai.transforms.utils import is_positive

    low, high = settings["intensity_range"]
    # labels=None: axis labels from the MetaTensor's space (RAS as loaded), MONAI's upcoming default
    load = [LoadImage(image_only=True, ensure_channel_first=True), Orientation(axcodes="RAS", labels=None)]
    if settings["pixdim"] is not None:
        load.append(Spacing(pixdim=settings["pixdim"], mode="bilinear"))
    load.append(ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    # foreground: above the window minimum (0 after scaling), as the paper's CropForegroundd(source_key="image")
    crop = [CropForeground(select_fn=is_positive), SpatialPad(spatial_size=settings["roi_size"])]
    return load, crop


def _preprocess_one(source: str, chains: tuple[list, list], settings: dict[str, Any]) -> np.ndarray:
    """The stored array of one image: ``(1, X, Y, Z)`` of the settings' dtype, each side >= the ROI.

    Raises:
        ValueError: not one channel, non-finite values, or no voxel above the window minimum.
    """
    load, crop = chains
    img = source
    for t in load:
        img = t(img)
    if img.ndim != 4 or img.shape[0] != 1:
        raise ValueError(f"expected one 3D channel, got shape {tuple(img.shape)} (channel first)")
    if not torch.isfinite(img).all():
        raise ValueError("holds NaN or Inf values")
    if not (img > 0).any():
        low = settings["intensity_range"][0]
        raise ValueError(f"no voxel above the window minimum ({low:g}): blank image, or not CT in HU?")
    for t in crop:
        img = t(img)
    arr = np.asarray(img.array, dtype=np.float32)
    np_dtype, scale = DTYPES[settings["dtype"]]
    if np.issubdtype(np_dtype, np.integer):
        arr = np.clip(np.rint(arr * scale), 0, scale)
    return np.ascontiguousarray(arr.astype(np_dtype))


def _npy_shape(path: Path, dtype: str) -> list[int] | None:
    """Shape of a stored volume read from its header, or None when it is unreadable or of another dtype."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if arr.dtype != np.dtype(DTYPES[dtype][0]) or arr.ndim != 4:
        return None
    return [int(s) for s in arr.shape]


def _write_index(
    index_file: Path,
    settings: dict,
    volumes: list[dict],
    datalists: list[str],
    complete: bool,
    extra: dict | None = None,
) -> None:
    head = {"settings": settings, "complete": complete, "datalists": datalists, **(extra or {})}
    text = json.dumps(head, indent=1)[:-2]  # one line per volume: readable, and small for thousands of them
    text += ',\n "volumes": [' + ",".join(f"\n  {json.dumps(v)}" for v in volumes) + "\n ]\n}\n"
    atomic_write(index_file, lambda f: f.write(text), mode="w")


def _parse_shard(shard: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``(i, n)`` from ``"i/n"`` or a pair, 0 <= i < n; None for no sharding.

    >>> _parse_shard("1/4"), _parse_shard((0, 2)), _parse_shard(None)
    ((1, 4), (0, 2), None)
    """
    if shard is None:
        return None
    try:
        i, n = (int(v) for v in (shard.split("/") if isinstance(shard, str) else shard))
    except (TypeError, ValueError):
        raise ValueError(f"shard must be 'i/n' (e.g. '0/4': the first of 4 shards), got {shard!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n (shards are numbered from 0)")
    return i, n


def _part_file(out: Path, shard: tuple[int, int]) -> Path:
    return out / "parts" / f"shard-{shard[0]}-of-{shard[1]}.json"


def _corpus_items(
    datalists: list[str], dataset_dir: str | os.PathLike, sections: Sequence[str]
) -> list[tuple[str, str]]:
    """``(source, section)`` of every image, in datalist order, each image once (under its first section).

    Raises:
        ValueError: no image at all, or every image of a later section (``"validation"``) is also in an
            earlier one (``"training"``): nothing would be held out. A partial overlap is a warning.
    """
    items: dict[str, str] = {}  # abs source -> section, first occurrence wins
    for section in sections:
        listed: list[tuple[str, str]] = []  # (datalist, source) of this section
        for dl in datalists:
            listed += [(dl, img) for img in _read_datalist(dl, dataset_dir, section)]
        overlap, kept = [], 0
        for dl, source in listed:
            key = os.path.abspath(source)
            if key not in items:
                items[key], kept = section, kept + 1
            elif items[key] == section:
                logger.warning(f"{dl}: {source} is listed more than once in {section!r}; stored once")
            else:
                overlap.append((dl, source, items[key]))
        if not overlap:
            continue
        named = ", ".join(dict.fromkeys(dl for dl, _, _ in overlap))
        earlier = "/".join(repr(s) for s in dict.fromkeys(s for _, _, s in overlap))
        example = overlap[0][1]
        if kept == 0:
            # the validation loss picks the best model_swinvit.pt: on training images it would only say how well
            # the network remembers them, so an all-overlapping list is refused rather than used with a warning
            raise ValueError(
                f"{named}: every image of section {section!r} ({len(overlap)}) is also listed in {earlier} (e.g. "
                f"{example}), so nothing is held out for the {section} loss that picks the best model; move some "
                f"volumes (a few dozen are enough) from {earlier} to {section!r} in the datalist, or list other volumes "
                f"under {section!r}"
            )
        logger.warning(
            f"{named}: {len(overlap)} of {len(overlap) + kept} image(s) of section {section!r} are also listed in "
            f"{earlier} (e.g. {example}); they are used in {earlier} only, and {section!r} keeps the other {kept}"
        )
    if not items:
        raise ValueError(f"no image in sections {list(sections)} of {', '.join(datalists)}")
    return [(source, section) for source, section in items.items()]


def _store_one(source: str, path: Path, chains: tuple[list, list], settings: dict, overwrite: bool) -> tuple:
    """Preprocess ``source`` into ``path`` unless a complete file of these settings is there already.

    Returns ``(shape, skipped, error)``: only the shape travels back, never the volume (RAM stays flat).
    """
    shape = None if overwrite else (_npy_shape(path, settings["dtype"]) if path.exists() else None)
    if shape is not None:
        return shape, True, None
    try:
        arr = _preprocess_one(source, chains, settings)
        atomic_write(path, lambda f: np.save(f, arr))
    except Exception as e:  # readers raise many types for missing, corrupt or truncated files
        return None, False, one_line_reason(e, innermost=False)
    return [int(s) for s in arr.shape], False, None


class _StoreTasks(torch.utils.data.Dataset):
    """Item ``k``: store volume ``k`` of a task list and return ``(position, (shape, skipped, error))``.

    A dataset so that ``torch.utils.data.DataLoader`` runs it in worker processes: it already starts,
    feeds and stops workers, passes Ctrl-C through, and gives each worker one torch thread.
    """

    def __init__(self, tasks: list[tuple[int, str, Path]], settings: dict, overwrite: bool) -> None:
        self.tasks, self.settings, self.overwrite = tasks, settings, overwrite
        self._chains: tuple[list, list] | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, k: int) -> tuple[int, tuple]:
        if self._chains is None:  # built in each worker on first use
            self._chains = _chains(self.settings)
        pos, source, path = self.tasks[k]
        return pos, _store_one(source, path, self._chains, self.settings, self.overwrite)


def _unbatched(item: Any) -> Any:
    return item


def _check_settings(file: Path, settings: dict, overwrite: bool) -> bool:
    """Whether ``file`` (an index or part) records ``settings``; refuses other settings unless ``overwrite``."""
    if not file.exists():
        return False
    try:
        old = read_corpus_index(file)["settings"]
    except ValueError:
        if not overwrite:
            raise
        return False
    if old != settings and not overwrite:
        changed = ", ".join(  # scale follows dtype: not listed on its own
            f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v and k != "scale"
        )
        raise ValueError(
            f"{file} was made with other settings ({changed}); pass overwrite=True (--overwrite) to rebuild "
            "it, or choose another out_dir"
        )
    return old == settings


def preprocess_corpus(
    datalists: str | os.PathLike | Sequence[str | os.PathLike],
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    pixdim: float | Sequence[float] | None = None,
    intensity_range: Sequence[float] = (-1000.0, 1000.0),
    roi_size: Sequence[int] = (96, 96, 96),
    dtype: str = "uint8",
    sections: Sequence[str] = ("training", "validation"),
    overwrite: bool = False,
    workers: int = 1,
    shard: str | Sequence[int] | None = None,
) -> Path:
    """Store every image of ``datalists`` once, windowed, cropped and padded, for ``MemmapCropDataset``.

    Per image, MONAI's ``LoadImage(ensure_channel_first=True)``, ``Orientation("RAS")``, optionally
    ``Spacing(pixdim)``, ``ScaleIntensityRange(low, high, 0, 1, clip=True)``, ``CropForeground``
    (voxels above ``low``) and ``SpatialPad(roi_size)``: the deterministic part of the paper's
    pre-training transforms (its code keeps the native spacing: ``pixdim=None``). The result,
    ``(1, X, Y, Z)`` with every side >= ``roi_size``, goes to ``out_dir/volumes/<name>.npy`` as
    ``round(x * 255)`` (uint8) or ``x`` (float16).

    Resumable: a re-run skips images already stored with the same settings, also after a killed run.
    An image listed twice (in two sections or datalists) is stored once, under its first section; a
    later section (``"validation"``) whose images are all in an earlier one is refused by name.
    Images that fail are collected; the index of the others is written before the error is raised.

    Parallel: ``workers`` processes on this machine (each holds one volume at a time; the main
    process only the index entries, so RAM stays flat in the corpus size). Sharded: ``shard="i/n"``
    stores every n-th image from the i-th (array jobs, or nodes) and writes only its part index
    ``out_dir/parts/shard-i-of-n.json``; :func:`merge_corpus` then writes ``index.json`` once (so does
    a run without ``shard``, which finds every volume stored and only reads their headers).

    Args:
        datalists: decathlon-style datalist JSON(s); see :func:`load_ssl_datalists`.
        dataset_dir: folder that relative image paths start from.
        out_dir: corpus folder; receives ``index.json`` and ``volumes/``.
        pixdim: target spacing in mm (3 values, or one for all axes); None keeps each image's own.
        intensity_range: HU window (low, high) mapped to 0..1, clipped.
        roi_size: the pre-training crop; every stored volume is padded to at least this.
        dtype: ``"uint8"`` (1/255 of the window, a quarter of float32's disk) or ``"float16"``.
        sections: datalist sections to store; each volume's section is recorded in the index.
        overwrite: rebuild an ``out_dir`` made with other settings (its old volumes are deleted, by a
            run without ``shard``), and recompute volumes already stored.
        workers: processes that preprocess; 0 or 1: this process.
        shard: ``"i/n"`` (or ``(i, n)``): this run's share, 0 <= i < n; None: all images.

    Returns:
        path of ``out_dir/index.json``, or of the part index when ``shard`` is given.

    Raises:
        FileNotFoundError: a datalist does not exist.
        ValueError: bad settings or datalists, no image in any section, a section with no image of its
            own, or ``out_dir`` holds a corpus made with other settings and ``overwrite`` is False.
        CorpusError: some images could not be read or stored; lists each file and its problem.
    """
    from tqdm import tqdm

    settings = _settings(pixdim, intensity_range, roi_size, dtype)
    datalists = [str(d) for d in _as_list(datalists)]
    if isinstance(sections, str) or not sections:
        raise ValueError(f"sections must be a non-empty list of section names, got {sections!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0 (0 or 1: this process), got {workers!r}")
    part = _parse_shard(shard)
    items = _corpus_items(datalists, dataset_dir, sections)

    out = Path(out_dir)
    index_file, vol_dir = out / "index.json", out / "volumes"
    target = index_file if part is None else _part_file(out, part)
    same = _check_settings(index_file, settings, overwrite)
    if part is not None:
        same = _check_settings(target, settings, overwrite)
    mine = [(pos, src, sec) for pos, (src, sec) in enumerate(items) if part is None or pos % part[1] == part[0]]

    def write(volumes: list[dict], complete: bool, failures: list[str] = ()) -> None:
        if part is None:
            _write_index(index_file, settings, volumes, datalists, complete)
        else:
            extra = {"shard": list(part), "total": len(items), "failures": list(failures)}
            _write_index(target, settings, volumes, datalists, complete, extra)

    if not same:
        # record the settings before the first volume, so a killed run is checked against them on resume
        write([], complete=False)
    vol_dir.mkdir(parents=True, exist_ok=True)

    tasks = [(pos, src, vol_dir / _stored_name(src, settings)) for pos, src, _ in mine]
    sections_of = {pos: sec for pos, _, sec in mine}
    loader = torch.utils.data.DataLoader(
        _StoreTasks(tasks, settings, overwrite),
        batch_size=None,
        collate_fn=_unbatched,
        num_workers=workers if workers > 1 else 0,
        in_order=False,  # a slow volume does not hold up the others
    )
    done: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}
    skipped = 0
    what = out if part is None else f"{out} (shard {part[0]}/{part[1]})"
    try:
        bar = tqdm(loader, total=len(tasks), desc=f"preprocess -> {what}", unit="vol", dynamic_ncols=True)
        for pos, (shape, was_stored, error) in bar:
            source = items[pos][0]
            if error is not None:
                failed[pos] = f"{source}: {error}"
                bar.set_postfix(failed=len(failed))
                continue
            skipped += was_stored
            name = _stored_name(source, settings)
            entry = {"file": f"{vol_dir.name}/{name}", "source": source, "section": sections_of[pos], "shape": shape}
            done[pos] = entry if part is None else {**entry, "pos": pos}
    finally:  # also on Ctrl-C: keep what is done
        volumes = [done[p] for p in sorted(done)]
        failures = [failed[p] for p in sorted(failed)]
        write(volumes, complete=not failures and len(volumes) == len(tasks), failures=failures)

    if part is None:
        _report_stale(out, {Path(v["file"]).name for v in volumes}, delete=overwrite)
    logger.info(f"{target}: {len(volumes)} volume(s), {skipped} already stored, {len(failures)} failed")
    if failures:
        rerun = "a re-run" if part is None else f"a re-run of shard {part[0]}/{part[1]}"
        raise CorpusError(
            f"{len(failures)} of {len(tasks)} image(s) could not be stored ({len(volumes)} stored and listed in "
            f"{target}; {rerun} retries only the failed ones):\n  " + "\n  ".join(failures)
        )
    return target


def _report_stale(out: Path, listed: set[str], delete: bool) -> None:
    """Delete (``delete``) or mention the stored volumes that the index does not list (earlier runs)."""
    vol_dir = out / "volumes"
    stale = [p for p in vol_dir.glob("*.npy") if p.name not in listed]
    if stale and delete:
        for p in stale:
            p.unlink()
        logger.info(f"{out}: deleted {len(stale)} volume(s) of earlier runs that the new index does not list")
    elif stale:
        size = sum(p.stat().st_size for p in stale) / 2**30
        logger.info(f"{vol_dir}: {len(stale)} file(s) ({size:.2f} GiB) are not in the index (earlier runs)")


def merge_corpus(out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/index.json`` once from the part indexes of a sharded :func:`preprocess_corpus`.

    The volumes come in the order one unsharded run lists them, so the index equals that run's.

    Returns:
        path of ``out_dir/index.json``.

    Raises:
        ValueError: no part index, parts of different shard counts, settings or datalists, or a shard
            that has not run (each named, with the command to run).
        CorpusError: a shard could not store some images (the index of the others is written first).
    """
    out = Path(out_dir)
    files = sorted((out / "parts").glob("shard-*-of-*.json"))
    if not files:
        raise ValueError(f"{out / 'parts'}: no part index (shard-i-of-n.json) to merge; run preprocess with --shard")
    parts = {}
    for f in files:
        part = read_corpus_index(f)
        if not isinstance(part.get("shard"), list) or not isinstance(part.get("total"), int):
            raise ValueError(f"{f}: not a part index (no 'shard' and 'total'); made by preprocess_corpus(shard=...)?")
        parts[f] = part
    counts = {tuple(p["shard"])[1] for p in parts.values()}
    if len(counts) > 1:
        raise ValueError(
            f"{out / 'parts'}: parts of {sorted(counts)} shards ({', '.join(f.name for f in files)}); delete the "
            "parts of the shard count no longer used"
        )
    n = counts.pop()
    first = next(iter(parts.values()))
    for f, p in parts.items():
        for key in ("settings", "datalists", "total"):
            if p[key] != first[key]:
                raise ValueError(f"{f}: {key} differ from {files[0]}'s ({p[key]!r} vs {first[key]!r}); re-run it")
    missing = sorted(set(range(n)) - {p["shard"][0] for p in parts.values()})
    if missing:
        raise ValueError(
            f"{out / 'parts'}: shard(s) {', '.join(f'{i}/{n}' for i in missing)} have not run (no "
            f"{_part_file(out, (missing[0], n)).name}); run them with --shard, then merge"
        )
    entries = sorted((v for p in parts.values() for v in p["volumes"]), key=lambda v: v["pos"])
    volumes = [{k: v for k, v in e.items() if k != "pos"} for e in entries]
    failures = [line for p in parts.values() for line in p.get("failures", [])]
    complete = all(p["complete"] for p in parts.values()) and len(volumes) == first["total"]
    index_file = out / "index.json"
    _write_index(index_file, first["settings"], volumes, first["datalists"], complete)
    _report_stale(out, {Path(v["file"]).name for v in volumes}, delete=False)
    logger.info(f"{index_file}: {len(volumes)} volume(s) merged from {n} shard(s)")
    unfinished = [f.name for f, p in parts.items() if not p["complete"] and not p.get("failures")]
    if failures or unfinished:
        raise CorpusError(
            f"{first['total'] - len(volumes)} of {first['total']} image(s) are not stored ({len(volumes)} listed in "
            f"{index_file}); re-run the shard(s) named, then merge again:"
            + "".join(f"\n  {line}" for line in failures)
            + "".join(f"\n  {name}: did not finish (killed?)" for name in unfinished)
        )
    return index_file


class Corpus:
    """The corpus of :func:`preprocess_corpus`, built (or checked and reused) on the first call.

    ``corpus()`` returns the path of ``index.json``; it preprocesses what is not stored yet, so a
    dataset reading ``corpus()`` works on a fresh data folder, e.g. when a bundle workflow is only
    initialised and its properties checked. Later calls return the same path at once. Under
    ``torch.distributed`` rank 0 preprocesses and every rank receives the result (the path, or rank
    0's error): call it on every rank, at the same point.

    Args:
        datalists, dataset_dir, out_dir: as :func:`preprocess_corpus`.
        options: the other arguments of :func:`preprocess_corpus` (not ``shard``).
    """

    def __init__(
        self,
        datalists: str | os.PathLike | Sequence[str | os.PathLike],
        dataset_dir: str | os.PathLike,
        out_dir: str | os.PathLike,
        **options: Any,
    ) -> None:
        if "shard" in options:
            raise ValueError("Corpus builds the whole corpus: run preprocess_corpus(shard=...) for a share of it")
        self.datalists, self.dataset_dir, self.out_dir, self.options = datalists, dataset_dir, out_dir, options
        self._index_file: Path | None = None

    def _build(self) -> Path:
        return preprocess_corpus(self.datalists, self.dataset_dir, self.out_dir, **self.options)

    def __call__(self) -> Path:
        if self._index_file is not None:
            return self._index_file
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            error, result = None, [None]
            if dist.get_rank() == 0:
                try:
                    result = [str(self._build())]
                except Exception as e:  # handed to the other ranks, raised here unchanged
                    error, result = e, [f"error: {one_line_reason(e, innermost=False)}"]
            dist.broadcast_object_list(result, src=0)
            if error is not None:
                raise error
            if result[0].startswith("error: "):
                raise RuntimeError(f"rank 0 could not prepare the corpus in {self.out_dir}: {result[0][7:]}")
            self._index_file = Path(result[0])
        else:
            self._index_file = self._build()
        return self._index_file
