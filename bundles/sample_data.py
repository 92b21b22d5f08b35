"""Turn the project's real CT sample (``shared/data/ct_sample``) into a BTCV-layout dataset folder.

The sample has one labelled 30-slice slab (TotalSegmentator labels, imported into the BTCV classes
with ``custom.tools.label_import``) and one unlabelled full CT. The dataset folder gets::

    imagesTr/img0001.nii.gz     the slab (link)
    labelsTr/label0001.nii.gz   its labels in BTCV indices (written)
    imagesTs/ct_full.nii.gz     the full CT to segment (link)
    dataset_0.json              the slab as both the training and the validation case
    ssl_dataset.json            for self-supervised pre-training: the full CT to train on, the slab
                                (another volume) for the held-out reconstruction loss

With one labelled volume the validation case is the training case: Dice measured on it shows that
the pipeline learns the anatomy, not how well a model generalises.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from custom.tools.label_import import import_labels

__all__ = ["DEFAULT_SAMPLE_DIR", "SMALL_SIZES", "prepare_sample_dataset"]

#: the shared sample, beside the repository checkout (``../shared/data/ct_sample``)
DEFAULT_SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct_sample"
#: the smallest Swin UNETR that runs (feature_size 12, 64^3 crops) on the sample's own 3 mm grid: the sizes
#: of the demo, the tests, the MONAI Label check and the CPU benchmarks (``bench.common.SIZES["small"]``)
SMALL_SIZES = {"feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [3.0, 3.0, 3.0]}


def prepare_sample_dataset(out_dir: str | os.PathLike, sample_dir: str | os.PathLike = DEFAULT_SAMPLE_DIR) -> Path:
    """Create (or reuse) the dataset folder ``out_dir``; returns the path of its ``dataset_0.json``.

    Raises:
        FileNotFoundError: ``sample_dir`` lacks one of the three sample files.
    """
    sample, out = Path(sample_dir), Path(out_dir)
    needed = ("ct_slab.nii.gz", "labels_slab_totalseg.nii.gz", "ct_full.nii.gz")
    missing = [n for n in needed if not (sample / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{sample.resolve()}: missing {missing} (the shared CT sample)")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    links = {"imagesTr/img0001.nii.gz": "ct_slab.nii.gz", "imagesTs/ct_full.nii.gz": "ct_full.nii.gz"}
    for dst, src in links.items():
        if not (out / dst).exists():
            os.symlink((sample / src).resolve(), out / dst)
    label = out / "labelsTr" / "label0001.nii.gz"
    if not label.exists():
        import_labels(str(sample / "labels_slab_totalseg.nii.gz"), str(label), "totalsegmentator_v2_to_btcv")
    case = {"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}
    datalist = {
        "description": "shared CT sample: one labelled slab (TotalSegmentator labels imported into BTCV classes)",
        "training": [case],
        "validation": [case],
        "test": ["imagesTs/ct_full.nii.gz"],
    }
    path = out / "dataset_0.json"
    path.write_text(json.dumps(datalist, indent=4) + "\n", encoding="utf-8")
    ssl = {"training": [{"image": "imagesTs/ct_full.nii.gz"}], "validation": [{"image": "imagesTr/img0001.nii.gz"}]}
    (out / "ssl_dataset.json").write_text(json.dumps(ssl, indent=4) + "\n", encoding="utf-8")
    return path
