"""What the per-case inference outputs cost on the real CT (ct_full.nii.gz) with a 14-class label map.

    python -m bench.outputs_cost [--repeats 5] [--out bench/results/outputs_cost_CPU_<date>.json]

Each figure is the median of ``--repeats`` runs in this process, against the baseline of the same run:
writing the label map with MONAI's ``SaveImage`` (what inference writes per case today). Measured:

- ``reload``: reading the input again (``LoadImage``; what the handlers do when the items carry no copy),
  and the memory a kept copy (``CopyItemsd`` after ``LoadImaged``) would hold instead;
- ``statistics``: :func:`custom.inference.statistics.label_statistics` alone, and the handler's whole
  case (reload, statistics, atomic JSON);
- ``preview``: render and write ``<case>_preview.png``;
- ``dicom_seg``: ct_full written as a DICOM series (ITK, one file per slice), read back by ``LoadImage``,
  the label map on that grid written as a SEG by highdicom (when installed).

The label map is made by thresholds (14 classes: HU bands inside the body), not by a network: the costs
depend on the grid and the number of classes, not on the quality of the segmentation.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CT = REPO.parent / "shared" / "data" / "ct_sample" / "ct_full.nii.gz"
NAMES = ["background"] + [f"class {i}" for i in range(1, 14)]


def threshold_labels(hu: np.ndarray) -> np.ndarray:
    """A 14-class label map from HU bands inside the body (the body: above -300 HU, holes filled)."""
    from scipy import ndimage

    body = ndimage.binary_fill_holes(ndimage.binary_opening(hu > -300, iterations=2))
    bands = np.digitize(hu, [-900, -300, -50, 0, 20, 35, 50, 70, 100, 200, 400, 700, 1000])
    return np.where(body, np.clip(bands, 1, 13), 0).astype(np.int64)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from monai.data import MetaTensor
    from monai.transforms import LoadImage, SaveImage

    from custom.inference.preview import save_preview
    from custom.inference.statistics import CaseStatistics, label_statistics

    work = Path(tempfile.mkdtemp(prefix="outputs_cost_"))
    load = LoadImage(image_only=True, ensure_channel_first=True)
    image = load(str(CT))
    labels = threshold_labels(image[0].numpy())
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    pred = MetaTensor(torch.as_tensor(labels[None], dtype=torch.float32), affine=image.affine, meta=meta)
    result: dict = {
        "input": CT.name,
        "shape": list(image.shape[1:]),
        "voxels": int(np.prod(image.shape[1:])),
        "classes_present": int(len(np.unique(labels))),
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }

    saver = SaveImage(output_dir=str(work / "seg"), output_postfix="seg", output_dtype=np.uint8, separate_folder=False)
    baseline = median_time(lambda: saver(pred), args.repeats)
    result["baseline_saveimage_s"] = round(baseline, 4)

    result["reload_s"] = round(median_time(lambda: load(str(CT)), args.repeats), 4)
    result["kept_copy_mib"] = round(image.element_size() * image.numel() / 2**20, 2)
    result["label_statistics_s"] = round(
        median_time(lambda: label_statistics(pred, image, image.affine, NAMES), args.repeats), 4
    )
    handler = CaseStatistics(work / "out", class_names=NAMES)
    result["statistics_case_s"] = round(
        median_time(lambda: handler.write_case({"pred": pred}, {}, "ct_full", str(CT)), args.repeats), 4
    )
    result["preview_s"] = round(
        median_time(
            lambda: save_preview(work / "out" / "ct_full_preview.png", image, pred, image.affine, NAMES, "ct_full"),
            args.repeats,
        ),
        4,
    )

    try:
        import highdicom  # noqa: F401

        have_highdicom = True
    except ImportError:
        have_highdicom = False
    if have_highdicom:
        import importlib.util

        import pydicom

        from custom.inference.dicom_seg import write_dicom_seg

        spec = importlib.util.spec_from_file_location("tests_conftest", REPO / "tests" / "conftest.py")
        conftest = importlib.util.module_from_spec(spec)  # the tests' DICOM writer (tests/ is no package)
        spec.loader.exec_module(conftest)
        write_dicom_series = conftest.write_dicom_series

        series = work / "series"
        write_dicom_series(CT, series)
        for f in sorted(series.iterdir()):
            ds = pydicom.dcmread(f)
            ds.FrameOfReferenceUID, ds.PatientID = "1.2.826.0.1.3680043.2.1125.7.9", "bench"
            ds.save_as(f)
        dicom_image = load(str(series))
        dicom_labels = threshold_labels(dicom_image[0].numpy())
        seg_path = work / "out" / "ct_full_seg.dcm"
        result["dicom_seg_s"] = round(
            median_time(
                lambda: write_dicom_seg(seg_path, dicom_labels, dicom_image.affine, series, NAMES), min(3, args.repeats)
            ),
            4,
        )
        result["dicom_seg_mib"] = round(seg_path.stat().st_size / 2**20, 2)
        result["dicom_instances"] = len(list(series.iterdir()))

    for key in ("statistics_case_s", "preview_s", "dicom_seg_s"):
        if key in result:
            result[key[: -len("_s")] + "_vs_saveimage"] = round(result[key] / baseline, 2)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=4))
    out = Path(args.out or REPO / "bench" / "results" / f"outputs_cost_CPU_{date.today().isoformat()}.json")
    out.write_text(json.dumps(result, indent=4) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
