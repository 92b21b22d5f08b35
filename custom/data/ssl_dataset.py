"""The SSL bundle's training data: random crops read through memory maps from a preprocessed corpus.

The corpus (``index.json`` and one ``.npy`` per volume) is written once by
``custom.data.ssl_preprocess.preprocess_corpus`` (also ``python -m custom.tools.ssl_corpus``); why, and
what each volume holds, is said there. This module is what training reads: the corpus format
(:data:`FORMAT_VERSION`, :data:`DTYPES`, :func:`read_corpus_index`) and :class:`MemmapCropDataset`, which
reads only the voxels of each crop through ``np.load(mmap_mode="r")``, so RAM stays flat however large the
corpus grows and crops per second are bound by the disk.

Layout of a corpus folder::

    index.json          settings, and per volume: file, source, section, shape
    volumes/<name>.npy  channel-first (1, X, Y, Z), RAS, uint8 round(x * 255) or float16 x, x in 0..1
    parts/shard-i-of-n.json  part index of shard i of n (``--shard i/n``), merged into index.json by ``--merge``
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom.utils import one_line_reason

__all__ = ["FORMAT_VERSION", "DTYPES", "read_corpus_index", "MemmapCropDataset"]

#: version of the corpus layout (index keys, file naming); an index of another version is refused
FORMAT_VERSION = 1

#: stored dtype -> (numpy dtype, scale): stored value = x * scale (rounded for integers), x in 0..1
DTYPES: dict[str, tuple[type, float]] = {"uint8": (np.uint8, 255.0), "float16": (np.float16, 1.0)}


def read_corpus_index(index_file: Path) -> dict[str, Any]:
    """The content of a corpus ``index.json`` (or of a shard's part index), its format version checked.

    Raises:
        ValueError: unreadable, not a corpus index, or of another :data:`FORMAT_VERSION`.
    """
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index_file}: unreadable corpus index ({e})") from e
    if not isinstance(index, dict) or not isinstance(index.get("settings"), dict):
        raise ValueError(f"{index_file}: not a corpus index (no 'settings'); made by custom.data.ssl_preprocess?")
    version = index["settings"].get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{index_file}: corpus format version {version}, this code reads {FORMAT_VERSION}")
    return index


class MemmapCropDataset(torch.utils.data.Dataset):
    """Random ROI crops read straight from a corpus of ``preprocess_corpus``, through memory maps.

    Item ``i`` is a list of ``num_samples`` dicts ``{"image": float32 tensor (1, *roi_size) in 0..1}``
    cropped from volume ``i`` of ``section``; MONAI's ``list_data_collate`` (the default of
    ``monai.data.DataLoader``) flattens them, so a batch of B items holds ``B * num_samples`` crops,
    as with ``RandSpatialCropSamplesd`` in the paper's pipeline. Only the crops' voxels are read.

    Crop corners are uniform over all positions where the ROI fits. Random mode draws them from
    torch's RNG, so ``monai.utils.set_determinism`` and the DataLoader's per-worker seeds make runs
    reproducible; ``deterministic=True`` draws them from a generator seeded by ``(seed, i)``, so item
    ``i`` is the same every time (validation: losses comparable across epochs).

    Memory maps are opened on first use in each process (never in ``__init__``: the dataset pickles
    into DataLoader workers as a few lists) and kept open, at most ``max_open_files`` per process
    (least recently used closed first: every map holds a file descriptor).

    Args:
        index_file: ``index.json`` written by ``custom.data.ssl_preprocess.preprocess_corpus``.
        section: which volumes to use (``"training"``, ``"validation"``, ...).
        roi_size: crop size; every volume of the section must be at least this large.
        num_samples: crops per volume and item.
        deterministic: fixed crops per item (see above).
        seed: seed of the deterministic crops.
        max_open_files: memory maps kept open per process.

    Attributes:
        settings: the index's preprocessing settings (dtype, scale, intensity_range, pixdim,
            roi_size, format_version), e.g. to check that the bundle's ROI and window match.
        volumes: the index entries of the section (file, source, section, shape).

    Raises:
        ValueError: unreadable index, no volume in ``section``, bad arguments, or a volume smaller
            than ``roi_size``.
    """

    def __init__(
        self,
        index_file: str | os.PathLike,
        section: str = "training",
        roi_size: Sequence[int] = (96, 96, 96),
        num_samples: int = 2,
        deterministic: bool = False,
        seed: int = 0,
        max_open_files: int = 128,
    ) -> None:
        self.index_file = Path(index_file)
        index = read_corpus_index(self.index_file)
        self.settings: dict[str, Any] = dict(index["settings"])
        if self.settings.get("dtype") not in DTYPES:
            raise ValueError(f"{self.index_file}: unknown stored dtype {self.settings.get('dtype')!r}")
        self.roi_size = tuple(int(r) for r in roi_size)
        if len(self.roi_size) != 3 or any(r < 1 for r in self.roi_size):
            raise ValueError(f"roi_size must be 3 positive integers, got {list(roi_size)}")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if int(max_open_files) < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.section, self.num_samples, self.deterministic = section, int(num_samples), bool(deterministic)
        self.seed, self.max_open_files = int(seed), int(max_open_files)
        self.volumes: list[dict[str, Any]] = [v for v in index.get("volumes", []) if v.get("section") == section]
        if not self.volumes:
            counts: dict[str, int] = {}
            for v in index.get("volumes", []):
                counts[v.get("section")] = counts.get(v.get("section"), 0) + 1
            held = counts or "none"
            made = ", ".join(str(d) for d in index.get("datalists", [])) or "its datalists"
            raise ValueError(
                f"{self.index_file}: no volume in section {section!r} (the index holds {held}); list volumes under "
                f"{section!r} in {made} (held out from the other sections), then preprocess again"
            )
        small = [v for v in self.volumes if any(s < r for s, r in zip(v["shape"][1:], self.roi_size, strict=True))]
        if small:
            listed = ", ".join(f"{v['file']} {v['shape'][1:]}" for v in small[:5])
            raise ValueError(
                f"{self.index_file}: {len(small)} volume(s) smaller than roi_size {list(self.roi_size)} (e.g. "
                f"{listed}); the corpus was padded to {self.settings.get('roi_size')}: re-run preprocess_corpus with "
                "this roi_size"
            )
        root = self.index_file.parent
        self._files = [str(root / v["file"]) for v in self.volumes]
        self._shapes = [tuple(int(s) for s in v["shape"]) for v in self.volumes]
        self._scale = float(self.settings["scale"])
        self._dtype = np.dtype(DTYPES[self.settings["dtype"]][0])
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._pid = -1

    def __len__(self) -> int:
        return len(self.volumes)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = OrderedDict(), -1  # maps are per process; reopened on first use
        return state

    def _volume(self, i: int) -> np.ndarray:
        """The memory map of volume ``i``, opened once per process."""
        if self._pid != os.getpid():  # a forked worker: the parent's maps are not ours to reuse
            self._maps, self._pid = OrderedDict(), os.getpid()
        vol = self._maps.get(i)
        if vol is None:
            try:
                vol = np.load(self._files[i], mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ValueError(
                    f"{self._files[i]}: cannot open stored volume ({one_line_reason(e, innermost=False)})"
                ) from e
            if tuple(vol.shape) != self._shapes[i] or vol.dtype != self._dtype:
                raise ValueError(
                    f"{self._files[i]}: {vol.dtype} {tuple(vol.shape)} on disk, {self._dtype} {self._shapes[i]} in "
                    f"{self.index_file}: the corpus changed after indexing; re-run preprocess_corpus"
                )
            self._maps[i] = vol
            while len(self._maps) > self.max_open_files:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(i)
        return vol

    def corners(self, i: int) -> torch.Tensor:
        """``(num_samples, 3)`` crop corners (voxel indices) for item ``i``, drawn as ``__getitem__`` draws them."""
        i = self._check_index(i)
        generator = None
        if self.deterministic:
            seed = int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0])
            generator = torch.Generator().manual_seed(seed)
        spans = [s - r + 1 for s, r in zip(self._shapes[i][1:], self.roi_size, strict=True)]
        u = torch.rand((self.num_samples, 3), generator=generator, dtype=torch.float64)
        return (u * torch.tensor(spans, dtype=torch.float64)).floor().long()

    def _check_index(self, i: int) -> int:
        n = len(self.volumes)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} volumes in section {self.section!r}")
        return i % n

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        i = self._check_index(int(i))
        corners = self.corners(i).tolist()
        vol = self._volume(i)
        rx, ry, rz = self.roi_size
        out = []
        for x, y, z in corners:
            crop = np.array(vol[:, x : x + rx, y : y + ry, z : z + rz], dtype=np.float32)  # reads only the crop
            if self._scale != 1.0:
                crop /= self._scale
            out.append({"image": torch.from_numpy(crop)})
        return out
