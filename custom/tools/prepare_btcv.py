"""Arrange the BTCV "Abdomen" Synapse download into the layout and ``dataset_0.json`` the bundle reads.

    python -m custom.tools.prepare_btcv --raw_dir /data/Abdomen/RawData --out_dir /data/BTCV

``--raw_dir`` is the unpacked ``RawData`` folder of the Synapse "Multi-Atlas Labeling Beyond the
Cranial Vault" challenge (``Training/img/img0001.nii.gz``, ``Training/label/label0001.nii.gz``,
``Testing/img/img0061.nii.gz``). The output folder gets ``imagesTr/``, ``labelsTr/``, ``imagesTs/``
(symbolic links to the raw files, or copies with ``--copy``) and ``dataset_0.json`` with the split
the paper's research code used: 24 training cases and validation cases 0035-0040.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

__all__ = ["DEFAULT_VALIDATION", "prepare_btcv"]

#: validation cases of the research code's dataset_0.json (the other 24 labelled cases train)
DEFAULT_VALIDATION = ("0035", "0036", "0037", "0038", "0039", "0040")


def _case_ids(folder: Path, prefix: str) -> dict[str, Path]:
    found = {}
    for p in sorted(folder.glob(f"{prefix}*.nii.gz")):
        m = re.fullmatch(rf"{prefix}(\d+)\.nii\.gz", p.name)
        if m:
            found[m.group(1)] = p
    return found


def prepare_btcv(
    raw_dir: str, out_dir: str, validation: tuple[str, ...] = DEFAULT_VALIDATION, copy: bool = False
) -> dict:
    """Build ``out_dir`` and return the datalist written to ``out_dir/dataset_0.json``.

    Raises:
        FileNotFoundError: ``raw_dir`` lacks ``Training/img`` or holds no ``img*.nii.gz``.
        ValueError: an image has no label (or the reverse), or a validation id is not a training case.
        FileExistsError: ``out_dir/dataset_0.json`` exists (nothing is overwritten).
    """
    raw, out = Path(raw_dir), Path(out_dir)
    images = _case_ids(raw / "Training" / "img", "img")
    labels = _case_ids(raw / "Training" / "label", "label")
    if not images:
        raise FileNotFoundError(f"{raw / 'Training' / 'img'}: no img*.nii.gz (is --raw_dir the RawData folder?)")
    if set(images) != set(labels):
        raise ValueError(
            f"images without labels: {sorted(set(images) - set(labels))}; labels without images: "
            f"{sorted(set(labels) - set(images))}"
        )
    unknown = sorted(set(validation) - set(images))
    if unknown:
        raise ValueError(f"validation cases {unknown} are not among the training cases {sorted(images)}")
    if (out / "dataset_0.json").exists():
        raise FileExistsError(f"{out / 'dataset_0.json'} exists: choose another --out_dir or remove it")
    tests = _case_ids(raw / "Testing" / "img", "img")

    def place(src: Path, sub: str) -> str:
        dst = out / sub / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copy2(src, dst) if copy else os.symlink(src.resolve(), dst)
        return f"{sub}/{src.name}"

    entries = {
        cid: {"image": place(images[cid], "imagesTr"), "label": place(labels[cid], "labelsTr")} for cid in images
    }
    datalist = {
        "description": "BTCV abdomen (Synapse RawData), split of the Swin UNETR research code",
        "training": [entries[c] for c in sorted(entries) if c not in validation],
        "validation": [entries[c] for c in sorted(entries) if c in validation],
        "test": [place(tests[c], "imagesTs") for c in sorted(tests)],
    }
    with open(out / "dataset_0.json", "w", encoding="utf-8") as f:
        json.dump(datalist, f, indent=4)
    return datalist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custom.tools.prepare_btcv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw_dir", required=True, help="the Synapse RawData folder")
    parser.add_argument("--out_dir", required=True, help="the bundle's dataset_dir to create")
    parser.add_argument("--validation", nargs="*", default=list(DEFAULT_VALIDATION), help="validation case ids")
    parser.add_argument("--copy", action="store_true", help="copy files instead of linking them")
    args = parser.parse_args(argv)
    try:
        d = prepare_btcv(args.raw_dir, args.out_dir, tuple(args.validation), copy=args.copy)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {Path(args.out_dir) / 'dataset_0.json'}: {len(d['training'])} training, "
        f"{len(d['validation'])} validation, {len(d['test'])} test images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
