"""The inference outputs users act on: statistics per organ, a readable preview, DICOM SEG, big volumes planned.

Unit tests on tiny real files (NIfTI written here, a DICOM series written with ITK, the real CT slab and its
TotalSegmentator labels), driven through Ignite events as the bundles' evaluator fires them, and one run of
the real ``run inference`` command with the handlers wired as the coordinator will wire them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BTCV, CT_UID, SMALL, run_bundle, write_dicom_series
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import LoadImage
from PIL import Image

from custom.inference import memory_plan
from custom.inference.case_outputs import check_enabled
from custom.inference.dicom_seg import MISSING_HIGHDICOM, CaseDicomSeg, frames_for_series, write_dicom_seg
from custom.inference.preview import case_dice, choose_slices, render_preview
from custom.inference.statistics import BORDER_NOTE, CSV_COLUMNS, CaseStatistics, label_statistics, statistics_table
from custom.utils import class_names_from_metadata

NAMES = ["background", "liver", "left kidney", "tumour"]
BTCV_NAMES = class_names_from_metadata(BTCV / "configs" / "metadata.json")
#: TotalSegmentator v2 class -> BTCV class (the sample's README)
TS_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13}


def btcv_labels(sample_dir: Path) -> np.ndarray:
    ts = np.asarray(nib.load(sample_dir / "labels_slab_totalseg.nii.gz").dataobj).astype(np.int64)
    out = np.zeros_like(ts)
    for a, b in TS_TO_BTCV.items():
        out[ts == a] = b
    return out


def as_pred(labels, like: MetaTensor, source: str | os.PathLike | None = None) -> MetaTensor:
    """``labels`` as the prediction after ``Invertd``: a float ``(1, X, Y, Z)`` MetaTensor on ``like``'s grid, naming its input."""
    meta = {k: v for k, v in like.meta.items() if k != "affine"}
    if source is not None:
        meta["filename_or_obj"] = str(source)
    data = torch.as_tensor(np.asarray(labels)[None] if np.ndim(labels) == 3 else labels, dtype=torch.float32)
    return MetaTensor(data, affine=like.affine, meta=meta)


def run_handlers(handlers, items: list[dict], engine_cls=Engine) -> Engine:
    """Fire the handlers as the evaluator does: one iteration per item, ``state.output`` = ``[item]``."""
    engine = engine_cls(lambda e, batch: [batch])
    for h in handlers:
        h.attach(engine)
    engine.run(items, max_epochs=1)
    return engine


@pytest.fixture()
def case(tmp_path) -> dict:
    """A NIfTI CT stored as int16 with slope 2 and intercept -1024 (HU = 2 x stored - 1024), 2 x 2 x 2.5 mm, and a label map."""
    shape = (12, 10, 8)
    rng = np.random.default_rng(0)
    hu = rng.integers(-200, 200, shape).astype(np.float64)
    hu[2:6, 3:7, 2:5] = 60 + rng.integers(-10, 10, (4, 4, 3))  # "liver"
    affine = np.diag([-2.0, 2.0, 2.5, 1.0])  # LAS on disk: the grid's own orientation is kept
    stored = np.floor((hu + 1024) / 2).astype(np.int16)
    hu = stored * 2.0 - 1024.0  # what the file means
    img = nib.Nifti1Image(stored, affine)
    img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "in" / "ct1.nii.gz"
    path.parent.mkdir()
    nib.save(img, path)
    label = np.zeros(shape, np.int64)
    label[2:6, 3:7, 2:5] = 1  # inside
    label[:3, 8:, 5:] = 2  # touches the border
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    pred = as_pred(label, loaded)
    return {"path": path, "hu": hu, "label": label, "pred": pred, "out": tmp_path / "out"}


# ---------------------------------------------------------------- statistics
def test_statistics_volume_hu_and_border_per_case_and_one_csv(case, tmp_path):
    second = tmp_path / "in" / "ct2.nii.gz"
    shutil.copy(case["path"], second)
    pred2 = as_pred(case["label"], case["pred"], second)
    handler = CaseStatistics(case["out"], class_names=NAMES)
    run_handlers([handler], [{"pred": case["pred"]}, {"pred": pred2}])

    doc = json.loads((case["out"] / "ct1_statistics.json").read_text(encoding="utf-8"))
    rows = {r["name"]: r for r in doc["classes"]}
    assert list(rows) == NAMES[1:]  # every class, background left out
    liver, kidney, tumour = rows["liver"], rows["left kidney"], rows["tumour"]
    inside = case["hu"][case["label"] == 1]
    assert liver["voxels"] == 48 and liver["volume_ml"] == pytest.approx(48 * 2 * 2 * 2.5 / 1000)
    assert liver["mean"] == pytest.approx(inside.mean(), abs=1e-3)  # HU after the slope, not the stored int16
    assert liver["std"] == pytest.approx(inside.std(), abs=1e-3)
    assert liver["touches_border"] is False and liver["note"] == ""
    assert kidney["touches_border"] is True and kidney["note"] == BORDER_NOTE
    assert kidney["volume_ml"] == pytest.approx(kidney["voxels"] * 0.01)  # a lower bound, not zeroed
    assert tumour["voxels"] == 0 and tumour["mean"] is None and tumour["touches_border"] is False
    assert doc["spacing_mm"] == [2.0, 2.0, 2.5] and doc["voxel_volume_ml"] == pytest.approx(0.01)

    with open(case["out"] / "statistics.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == CSV_COLUMNS
    assert [(r["case"], r["name"]) for r in table] == [(c, n) for c in ("ct1", "ct2") for n in NAMES[1:]]
    assert table[0]["volume_ml"] == "0.48" and table[2]["mean"] == ""

    printed = statistics_table(case["out"] / "ct1_statistics.json").splitlines()  # what the demo prints
    assert printed[0] == "ct1" and len(printed) == 4  # case, header, the two classes found (tumour has none)
    assert printed[2].split()[:5] == ["1", "liver", "48", "0.5", f"{inside.mean():.1f}"]
    assert printed[3].endswith("yes (volume is a lower bound)")


def test_a_rerun_lists_the_skipped_cases_earlier_statistics_in_its_csv(case, tmp_path):
    from custom.data.cases import SKIPPED

    run_handlers([CaseStatistics(case["out"], class_names=NAMES)], [{"pred": case["pred"]}])
    second = tmp_path / "in" / "ct2.nii.gz"
    shutil.copy(case["path"], second)
    skipped = {
        "image": [str(case["path"])],
        SKIPPED: [str(case["out"] / "ct1_seg.nii.gz")],
    }  # as CaseDataset batches it
    engine = Engine(lambda e, batch: [] if SKIPPED in batch else [batch])
    CaseStatistics(case["out"], class_names=NAMES).attach(engine)
    engine.run([skipped, {"pred": as_pred(case["label"], case["pred"], second)}], max_epochs=1)
    with open(case["out"] / "statistics.csv", encoding="utf-8") as f:
        assert sorted({r["case"] for r in csv.DictReader(f)}) == ["ct1", "ct2"]


def test_the_input_is_read_once_for_both_handlers_and_released_before_the_next_case(case, monkeypatch):
    from monai.transforms import LoadImage as Loader

    from custom.inference.preview import CasePreview

    reads = []
    call = Loader.__call__
    monkeypatch.setattr(Loader, "__call__", lambda self, *a, **k: reads.append(a[0]) or call(self, *a, **k))
    handlers = [CaseStatistics(case["out"], class_names=NAMES), CasePreview(case["out"], class_names=NAMES)]
    engine = run_handlers(handlers, [{"pred": case["pred"]}])
    assert reads == [str(case["path"])] and "image_raw" in engine.state.output[0]
    engine.fire_event(Events.ITERATION_STARTED)  # the next case starts: the copy is not held while it runs
    assert "image_raw" not in engine.state.output[0]
    assert (case["out"] / "ct1_preview.png").is_file() and (case["out"] / "ct1_statistics.json").is_file()


def test_statistics_take_a_kept_copy_of_the_input_instead_of_reading_it_again(case):
    raw = LoadImage(image_only=True, ensure_channel_first=True)(str(case["path"]))
    os.remove(case["path"])  # reading the file again would fail
    run_handlers([CaseStatistics(case["out"], class_names=NAMES)], [{"pred": case["pred"], "image_raw": raw}])
    doc = json.loads((case["out"] / "ct1_statistics.json").read_text(encoding="utf-8"))
    assert doc["classes"][0]["voxels"] == 48


def test_label_statistics_refuses_other_grids_and_values():
    with pytest.raises(ValueError, match="differs"):
        label_statistics(np.zeros((4, 4, 4), int), np.zeros((4, 4, 5)), np.eye(4), NAMES)
    with pytest.raises(ValueError, match="within 0..3"):
        label_statistics(np.full((4, 4, 4), 7), None, np.eye(4), NAMES)


class FakeCaseEvaluator(Engine):
    """The bookkeeping of ``custom.data.cases.CaseEvaluator`` that the handlers report to."""

    def __init__(self, process):
        super().__init__(process)
        self.written, self.failed = [], []


def test_a_failed_output_fails_that_case_only_and_items_without_a_source_are_passed_by(case, caplog):
    wrong = as_pred(np.zeros((5, 5, 5)), case["pred"], case["path"])
    other = case["path"].with_name("ct2.nii.gz")
    shutil.copy(case["path"], other)
    good = as_pred(case["label"], case["pred"], other)
    monai_label_like = {"pred": torch.zeros(1, 4, 4, 4), "image_path": "/somewhere/ct.nii.gz"}
    engine = FakeCaseEvaluator(lambda e, batch: [batch])
    engine.written = [str(case["path"]), str(other)]
    CaseStatistics(case["out"], class_names=NAMES).attach(engine)
    with caplog.at_level(logging.ERROR):
        engine.run([{"pred": wrong}, monai_label_like, {"pred": good}], max_epochs=1)
    assert engine.written == [str(other)]
    assert len(engine.failed) == 1 and str(case["path"]) in engine.failed[0] and "not the same grid" in engine.failed[0]
    assert sorted(p.name for p in case["out"].iterdir()) == ["ct2_statistics.json", "statistics.csv"]


def test_switches_refuse_strings(tmp_path):
    with pytest.raises(ValueError, match="--statistics False"):
        CaseStatistics(tmp_path, class_names=NAMES, enabled="false")
    assert check_enabled(False, "preview") is False
    engine = run_handlers([CaseStatistics(tmp_path / "off", class_names=NAMES, enabled=False)], [{"pred": None}])
    assert engine.state.iteration == 1 and not (tmp_path / "off").exists()


# ---------------------------------------------------------------- preview
def test_preview_cuts_through_the_structures_at_physical_aspect_with_a_legend(sample_dir, tmp_path):
    from custom.inference.case_outputs import original_image
    from custom.inference.preview import CasePreview
    from custom.inference.visualize import label_palette

    source = tmp_path / "slab.nii.gz"
    shutil.copy(sample_dir / "ct_slab.nii.gz", source)
    image = original_image({}, {}, "raw", str(source))
    labels = btcv_labels(sample_dir)
    pred = as_pred(labels, image)
    run_handlers([CasePreview(tmp_path / "out", class_names=BTCV_NAMES)], [{"pred": pred}])
    picture = Image.open(tmp_path / "out" / "slab_preview.png").convert("RGB")
    assert picture.width >= 800
    colours = {tuple(c) for c in np.asarray(picture).reshape(-1, 3)}
    palette = label_palette(len(BTCV_NAMES))
    present = set(np.unique(labels).tolist()) - {0}
    assert all(tuple(int(v) for v in palette[c]) in colours for c in present)  # each present class's legend swatch
    assert tuple(int(v) for v in palette[5]) not in colours  # the esophagus is absent: not in the legend

    # views through the structures: a blob far from the centre is where every view cuts
    blob = np.zeros((40, 30, 20), np.int64)
    blob[30:34, 3:6, 15:18] = 2
    assert choose_slices(blob) in [(x, y, z) for x in range(30, 34) for y in range(3, 6) for z in range(15, 18)]
    # physical aspect: 1 x 1 x 3 mm voxels, the coronal panel is 40 mm wide and 60 mm high
    rendered = render_preview(np.zeros((40, 30, 20)), blob, np.diag([1.0, 1.0, 3.0, 1.0]), NAMES, title="blob")
    (_, _, w_ax, h_ax), (_, _, w_co, h_co), (_, _, w_sa, h_sa) = rendered.info["panels"][0]
    assert h_co / w_co == pytest.approx(60 / 40, rel=0.03) and h_ax / w_ax == pytest.approx(30 / 40, rel=0.03)
    assert h_sa / w_sa == pytest.approx(60 / 30, rel=0.03) and w_co == pytest.approx(w_ax, abs=1)


def test_preview_is_the_same_picture_whatever_the_storage_orientation(sample_dir):
    nii = nib.load(sample_dir / "ct_slab.nii.gz")
    image, labels, affine = np.asarray(nii.dataobj), btcv_labels(sample_dir), nii.affine  # stored RAS
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = image.shape[0] - 1
    las = affine @ flip  # the same voxels stored right-to-left, axes swapped as well below
    ras_picture = render_preview(image, labels, affine, BTCV_NAMES, title="slab")
    stored = np.ascontiguousarray(np.transpose(image[::-1], (1, 0, 2)))
    stored_labels = np.ascontiguousarray(np.transpose(labels[::-1], (1, 0, 2)))
    swap = np.eye(4)[[1, 0, 2, 3]]
    other = render_preview(stored, stored_labels, las @ swap, BTCV_NAMES, title="slab")
    assert np.array_equal(np.asarray(ras_picture), np.asarray(other))


def test_evaluation_preview_has_prediction_and_label_rows_and_the_case_dice(sample_dir, tmp_path):
    labels = btcv_labels(sample_dir)
    pred = labels.copy()
    pred[pred == 7] = 0  # the stomach missed
    image = np.asarray(nib.load(sample_dir / "ct_slab.nii.gz").dataobj)
    affine = nib.load(sample_dir / "ct_slab.nii.gz").affine
    single = render_preview(image, pred, affine, BTCV_NAMES, title="slab")
    both = render_preview(image, pred, affine, BTCV_NAMES, title="slab", label=labels)
    assert len(both.info["panels"]) == 2 and both.height > single.height
    present = len(set(np.unique(labels).tolist()) - {0})
    assert both.info["dice"] == pytest.approx((present - 1) / present)  # one class of `present` at 0, others 1
    assert case_dice(pred, labels) == both.info["dice"]

    # as EvaluationReport would call it on a post-processed item (image scaled to 0..1, prediction naming its file)
    from custom.inference.preview import save_evaluation_preview

    loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(sample_dir / "ct_slab.nii.gz"))
    item = {"image": loaded / 1000.0, "label": as_pred(labels, loaded), "pred": as_pred(pred, loaded)}
    path = save_evaluation_preview(tmp_path / "slab_preview.png", item, BTCV_NAMES, "slab")
    written = Image.open(path)
    assert written.size == both.size and "image_raw" in item  # the CT read again: the HU window, not 0..1
    with pytest.raises(ValueError, match="at least 800"):
        render_preview(image, pred, affine, width=500)


# ---------------------------------------------------------------- DICOM SEG
FOR_UID = "1.2.826.0.1.3680043.2.1125.7.9"


@pytest.fixture()
def series(tmp_path, sample_dir) -> tuple[Path, list[str], range]:
    """Twelve slices of the CT slab as a DICOM series, file names in the reverse of the slice order."""
    import pydicom

    folder = tmp_path / "in" / "series1"
    slices = range(8, 20)
    write_dicom_series(sample_dir / "ct_slab.nii.gz", folder, slices=slices)
    uids = []
    for i in slices:
        path = folder / f"slice{i:03d}.dcm"
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID, ds.PatientID = FOR_UID, "p1"  # ITK writes none; every scanner does
        os.remove(path)
        ds.save_as(folder / f"file{99 - i:03d}.dcm")  # sorted by name: the last slice first
        uids.append(str(ds.SOPInstanceUID))
    return folder, uids, slices


def test_dicom_seg_references_the_series_and_matches_the_label_map_voxel_for_voxel(series, sample_dir, tmp_path):
    import highdicom as hd

    folder, uids, slices = series
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(folder))  # the grid inference writes on
    labels = btcv_labels(sample_dir)[:, :, slices.start : slices.stop]
    assert np.array_equal(
        loaded[0].numpy(), np.asarray(nib.load(sample_dir / "ct_slab.nii.gz").dataobj)[..., slices.start : slices.stop]
    )
    pred = as_pred(labels, loaded)
    run_handlers([CaseDicomSeg(tmp_path / "out", meta_file=BTCV / "configs" / "metadata.json")], [{"pred": pred}])

    seg = hd.seg.segread(tmp_path / "out" / "series1_seg.dcm")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert [s.SegmentLabel for s in seg.SegmentSequence] == BTCV_NAMES[1:]
    liver = seg.SegmentSequence[5].SegmentedPropertyTypeCodeSequence[0]
    assert (liver.CodeValue, liver.CodingSchemeDesignator) == ("10200004", "SCT")
    kidney = seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]
    assert kidney.CodeValue == "64033007" and kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Right"
    referenced = {
        r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence
    }
    assert referenced == set(uids) and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == CT_UID
    nonempty = sum(len(set(np.unique(labels[:, :, k]).tolist()) - {0}) for k in range(labels.shape[2]))
    assert seg.NumberOfFrames == nonempty  # one frame per segment and slice that holds it
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    expected = np.stack([labels[:, :, k].T for k in range(labels.shape[2])])  # ITK: slice k -> rows y, columns x
    assert np.array_equal(pixels, expected)


def test_dicom_seg_refuses_a_label_map_off_the_series_grid_and_names_highdicom_when_missing(series, monkeypatch):
    import pydicom

    folder, _, _ = series
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    shifted = np.diag([3.0, 3.0, 3.0, 1.0])
    shifted[:3, 3] = [-177.9563 + 1.5, 11.319, 118.3018]
    with pytest.raises(ValueError, match="not on this series' grid"):
        frames_for_series(np.zeros((122, 101, 12), int), shifted, datasets)
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(ImportError, match="pip install highdicom"):
        write_dicom_seg(folder.parent / "x.dcm", np.zeros((122, 101, 12), int), shifted, folder, NAMES)
    assert MISSING_HIGHDICOM.startswith("dicom_seg needs highdicom")


def test_dicom_seg_passes_by_file_inputs(case):
    run_handlers([CaseDicomSeg(case["out"], class_names=NAMES)], [{"pred": case["pred"]}])
    assert not case["out"].exists()


# ---------------------------------------------------------------- memory plan
GIB = 2**30


def test_memory_plan_stitches_on_the_device_then_the_cpu_then_refuses(monkeypatch):
    device_free, host_free = [8 * GIB], [64 * GIB]
    monkeypatch.setattr(memory_plan.cache_plan, "device_budget_bytes", lambda device, reserve: device_free[0])
    monkeypatch.setattr(memory_plan.cache_plan, "host_budget_bytes", lambda margin: host_free[0])
    args = ((256, 256, 300), 14, (96, 96, 96), 4, "cuda:0")
    stitch = 256 * 256 * 300 * 4 * 17  # 14 classes + count + padded input + argmax, float32
    plan = memory_plan.plan_stitching(*args)
    assert plan.device == torch.device("cuda:0") and plan.stitch_bytes == stitch
    device_free[0] = 1 * GIB
    plan = memory_plan.plan_stitching(*args)
    assert plan.on_cpu and "stitching on the CPU" in plan.message
    host_free[0] = 1 * GIB
    with pytest.raises(memory_plan.MemoryPlanError, match=r"stitching 14 x 256x256x300 needs 1\.25 GiB.*Not started"):
        memory_plan.plan_stitching(*args)
    # the CPU network: 4 windows' activations (4 x 96^3 x 500 B, 1.65 GiB) beside the stitching (1.25 GiB)
    host_free[0] = 3 * GIB
    with pytest.raises(memory_plan.MemoryPlanError, match=r"activations 1\.65 GiB.*more than it has \(3\.00 GiB"):
        memory_plan.plan_stitching((256, 256, 300), 14, (96, 96, 96), 4, "cpu")
    host_free[0] = 7 * GIB
    plan = memory_plan.plan_stitching((256, 256, 300), 14, (96, 96, 96), 4, "cpu")
    assert plan.host_bytes < 7 * GIB and "at its peak, the network" in plan.message


def test_planned_inferer_equals_monai_and_refuses_before_any_window(monkeypatch, caplog):
    from monai.inferers import SlidingWindowInferer

    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    calls = []

    def network(x):
        calls.append(x.shape)
        return net(x)

    x = torch.rand(1, 1, 40, 36, 20)
    monkeypatch.setattr(memory_plan.cache_plan, "host_budget_bytes", lambda margin: GIB)
    planned = memory_plan.PlannedSlidingWindowInferer((32, 32, 16), num_classes=3, sw_batch_size=2, overlap=0.25)
    with torch.no_grad(), caplog.at_level(logging.INFO):
        out = planned(x, network)
        ref = SlidingWindowInferer((32, 32, 16), sw_batch_size=2, overlap=0.25)(x, net)
    assert torch.allclose(out, ref) and planned.last_plan.on_cpu and "on the CPU" in caplog.text
    monkeypatch.setattr(memory_plan.cache_plan, "host_budget_bytes", lambda margin: 1000)
    calls.clear()
    with pytest.raises(memory_plan.MemoryPlanError):
        planned(x, network)
    assert calls == []


# ---------------------------------------------------------------- wired into the real command
def test_inference_command_writes_statistics_preview_and_dicom_seg(tmp_path, sample_dir, series):
    """``run inference`` as it stands writes the outputs beside each label map, and plans the stitching."""
    from monai.networks.nets import SwinUNETR

    folder, _, _ = series
    shutil.copy(sample_dir / "ct_slab.nii.gz", folder.parent / "slab.nii.gz")
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    torch.save(SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict(), ckpt / "model.pt")
    out = tmp_path / "out"
    overrides = {**SMALL, "input_dir": str(folder.parent), "output_dir": str(out), "ckpt_dir": str(ckpt)}
    proc = run_bundle("inference", ["configs/inference.json"], overrides)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "series1_preview.png",
        "series1_seg.dcm",
        "series1_seg.nii.gz",
        "series1_statistics.json",
        "slab_preview.png",
        "slab_seg.nii.gz",
        "slab_statistics.json",
        "statistics.csv",
    ], proc.stderr[-3000:]
    written = np.asarray(nib.load(out / "slab_seg.nii.gz").dataobj)
    doc = json.loads((out / "slab_statistics.json").read_text(encoding="utf-8"))
    assert [r["voxels"] for r in doc["classes"]] == [int((written == c).sum()) for c in range(1, 14)]
    assert "stitching 14 x" in proc.stderr + proc.stdout


def test_monai_label_path_runs_the_planned_inferer_and_none_of_the_outputs(tmp_path, sample_dir):
    """What MONAI Label takes from inference.json (preprocessing, inferer, postprocessing), on its kind of data."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import SwinUNETR

    ckpt, out = tmp_path / "models", tmp_path / "out"
    ckpt.mkdir()
    torch.save(SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict(), ckpt / "model.pt")
    parser = ConfigParser()
    parser.read_config(str(BTCV / "configs" / "inference.json"))
    parser.update(
        {"bundle_root": str(BTCV), "ckpt_dir": str(ckpt), "output_dir": str(out), "input_dir": str(sample_dir)}
    )
    parser.update({k: v for k, v in SMALL.items() if k in parser})
    image = str(sample_dir / "ct_slab.nii.gz")
    data = parser.get_parsed_content("preprocessing")({"image": image, "image_path": image})  # MONAI Label's keys
    inferer, network = parser.get_parsed_content("inferer"), parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    result = parser.get_parsed_content("postprocessing")(data)
    window = inferer.inferer  # the body crop wraps the planned sliding window
    assert isinstance(window, memory_plan.PlannedSlidingWindowInferer) and window.last_plan is not None
    assert tuple(result["pred"].shape[1:]) == nib.load(image).shape
    assert sorted(p.name for p in out.iterdir()) == ["ct_slab_seg.nii.gz"]  # SaveImaged only: no handler ran
