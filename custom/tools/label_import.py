"""Import a label map from another labelling scheme into a bundle's classes.

    python -m custom.tools.label_import --src seg.nii.gz --dst label0001.nii.gz --mapping totalsegmentator_v2_to_btcv

``--mapping`` is a built-in name (:data:`MAPPINGS`) or a JSON file ``{"source index": target index}``.
Every source value not in the map becomes background (0). The output keeps the input's grid (affine
and header) and is stored as uint8 (uint16 for targets above 255).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping

import nibabel as nib
import numpy as np

__all__ = ["MAPPINGS", "TOTALSEG_V2_TO_BTCV", "load_mapping", "remap_labels", "import_labels"]

#: TotalSegmentator v2 "total" task class index -> BTCV index (table in shared/data/ct_sample/README.md)
TOTALSEG_V2_TO_BTCV: dict[int, int] = {
    1: 1,  # spleen
    2: 2,  # kidney_right
    3: 3,  # kidney_left
    4: 4,  # gallbladder
    15: 5,  # esophagus
    5: 6,  # liver
    6: 7,  # stomach
    52: 8,  # aorta
    63: 9,  # inferior_vena_cava
    64: 10,  # portal_vein_and_splenic_vein
    7: 11,  # pancreas
    8: 12,  # adrenal_gland_right
    9: 13,  # adrenal_gland_left
}

MAPPINGS: dict[str, dict[int, int]] = {"totalsegmentator_v2_to_btcv": TOTALSEG_V2_TO_BTCV}


def load_mapping(spec: str | Mapping) -> dict[int, int]:
    """A built-in mapping by name, a JSON file path, or a dict; keys and values as ints.

    Raises:
        ValueError: unknown name, unreadable file, non-integer or negative entries.
    """
    if isinstance(spec, Mapping):
        raw = spec
    elif spec in MAPPINGS:
        raw = MAPPINGS[spec]
    elif os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"mapping file {spec}: not valid JSON ({e})") from e
    else:
        raise ValueError(f"mapping {spec!r}: neither a built-in ({', '.join(MAPPINGS)}) nor a JSON file")
    try:
        mapping = {int(k): int(v) for k, v in raw.items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"mapping {spec!r}: keys and values must be integers ({e})") from e
    if any(k < 0 or v < 0 for k, v in mapping.items()):
        raise ValueError(f"mapping {spec!r}: negative label indices")
    return mapping


def remap_labels(labels: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Map each voxel's source index through ``mapping``; unmapped values become 0.

    >>> remap_labels(np.array([0, 1, 5, 52, 99]), TOTALSEG_V2_TO_BTCV).tolist()
    [0, 1, 6, 8, 0]
    """
    if labels.size and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise ValueError("label map holds fractional values: not a label map")
    src = labels.astype(np.int64)
    if src.size and src.min() < 0:
        raise ValueError(f"label map holds negative values (min {src.min()})")
    top = max(int(src.max()) if src.size else 0, max(mapping, default=0))
    lut = np.zeros(top + 1, dtype=np.int64)
    for k, v in mapping.items():
        lut[k] = v
    out = lut[src]
    return out.astype(np.uint8 if max(mapping.values(), default=0) <= 255 else np.uint16)


def import_labels(src: str, dst: str, mapping: str | Mapping, overwrite: bool = False) -> dict[int, int]:
    """Remap the label file ``src`` into ``dst`` (same grid). Returns voxel counts per target index.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False, or ``dst`` is ``src``.
    """
    if os.path.abspath(src) == os.path.abspath(dst):
        raise FileExistsError(f"dst is the source file {src}: refusing to overwrite the original labels")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    lut = load_mapping(mapping)
    img = nib.load(src)
    out = remap_labels(np.asanyarray(img.dataobj), lut)
    header = img.header.copy()
    header.set_data_dtype(out.dtype)
    header["scl_slope"], header["scl_inter"] = 1, 0
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    nib.save(nib.Nifti1Image(out, img.affine, header), dst)
    values, counts = np.unique(out, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custom.tools.label_import", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="source label map (NIfTI)")
    parser.add_argument("--dst", required=True, help="output label map (NIfTI)")
    parser.add_argument("--mapping", required=True, help=f"built-in ({', '.join(MAPPINGS)}) or JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    args = parser.parse_args(argv)
    try:
        counts = import_labels(args.src, args.dst, args.mapping, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: voxels per label {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
