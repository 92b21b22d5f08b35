"""A folder with bad cases in it: each bad case is named and counted, every good one is written, nothing is replaced.

Through the real ``run inference`` command with a tiny untrained model (the outputs' content does not
matter here, only which files are written, kept or named), on the real CT slab.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from helpers import CT_UID, LOCALIZER_UID, REPO, SMALL, run_bundle, sha256, truncated, write_dicom_series

SLAB = "ct_slab.nii.gz"

#: these tests count the label maps a folder of bad cases leaves; the other outputs (statistics, preview,
#: DICOM SEG) of each written case are tested in test_outputs.py
LABEL_MAPS_ONLY = {"statistics": False, "preview": False, "dicom_seg": False}


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> str:
    """``ckpt_dir`` holding a tiny untrained BTCV model (feature_size 12): cheaper than training one."""
    import torch
    from monai.networks.nets import SwinUNETR

    ckpt = tmp_path_factory.mktemp("untrained")
    torch.save(SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict(), ckpt / "model.pt")
    return str(ckpt)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, sample_dir) -> tuple[Path, Path, dict[str, str]]:
    """An input folder of good and bad cases, an output folder holding a user's file; returns both and the hashes."""
    root = tmp_path_factory.mktemp("bad_folder")
    inp, out = root / "in", root / "out"
    inp.mkdir()
    slab = sample_dir / SLAB
    truncated(slab, inp / "0_truncated.nii.gz")  # first in the list
    shutil.copy(slab, inp / "a.nii.gz")
    itk.imwrite(itk.imread(str(slab)), str(root / "whole.mha"))
    truncated(root / "whole.mha", inp / "b.mha")  # between two good cases
    shutil.copy(slab, inp / "c.nii.gz")
    shutil.copy(slab, inp / "ct.nii.gz")  # ct.nii.gz and ct.mha: two cases, two outputs
    shutil.copy(root / "whole.mha", inp / "ct.mha")
    nib.save(nib.Nifti1Image(np.zeros((40, 40), np.float32), np.eye(4)), str(inp / "flat.nii.gz"))  # a 2-D image
    write_dicom_series(slab, inp / "two_series")
    write_dicom_series(slab, inp / "two_series", LOCALIZER_UID, range(10), prefix="loc")
    write_dicom_series(slab, inp / "gap", slices=[i for i in range(30) if i != 14])
    (inp / "notes").mkdir()
    (inp / "notes" / "readme.txt").write_text("not an image", encoding="utf-8")
    out.mkdir()
    (out / "c_seg.nii.gz").write_bytes(b"the user's own segmentation of c")
    hashes = {str(p.relative_to(root)): sha256(p) for p in [*inp.rglob("*"), *out.rglob("*")] if p.is_file()}
    return inp, out, hashes


def unchanged(root: Path, hashes: dict[str, str]) -> list[str]:
    return [name for name, h in hashes.items() if not (root / name).is_file() or sha256(root / name) != h]


def test_bad_cases_are_named_and_counted_the_good_ones_written(bad_folder, untrained):
    inp, out, hashes = bad_folder
    args = {**SMALL, **LABEL_MAPS_ONLY, "ckpt_dir": untrained, "input_dir": str(inp), "output_dir": str(out)}

    # preflight (the default) names every bad input, of every format, before any model is built
    proc = run_bundle("inference", ["configs/inference.json"], args, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "check_data found 5 problem(s)" in text, text[-3000:]
    for name, problem in [
        ("0_truncated.nii.gz", "unreadable image"),
        ("b.mha", "unreadable image"),
        ("flat.nii.gz", "a 2-D image"),
        ("two_series", f"holds 2 DICOM series: SeriesInstanceUID {CT_UID} (30 files); SeriesInstanceUID"),
        ("gap", "6 mm between slice013.dcm and slice015.dcm (about 1 slice(s) missing)"),
    ]:
        assert any(str(inp / name) in line and problem in line for line in text.splitlines()), (name, problem)
    assert "CheckpointLoader" not in text and "Restored all variables" not in text
    assert "notes/ (a folder with no DICOM file)" in text  # said, not skipped silently
    assert "c.nii.gz: skipped, its output" in text
    assert sorted(p.name for p in out.iterdir()) == ["c_seg.nii.gz"]

    # without preflight each bad case fails on its own, every good case is written, the exit status says so
    proc = run_bundle("inference", ["configs/inference.json"], {**args, "preflight": False}, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    summary = text[text.rindex("inference summary:") :]
    assert summary.startswith("inference summary: 9 case(s): 3 written, 1 skipped (output exists), 5 failed")
    for name in ("0_truncated.nii.gz", "b.mha", "flat.nii.gz", "two_series", "gap"):
        assert f"FAILED: {inp / name}: " in summary, name
    assert f"skipped: {inp / 'c.nii.gz'} (output {out / 'c_seg.nii.gz'} kept)" in summary
    assert sorted(p.name for p in out.iterdir()) == [
        "a_seg.nii.gz",
        "c_seg.nii.gz",
        "ct_mha_seg.nii.gz",
        "ct_nii_gz_seg.nii.gz",
    ]
    for name in ("a", "ct_mha", "ct_nii_gz"):
        assert nib.load(out / f"{name}_seg.nii.gz").shape == nib.load(inp / "a.nii.gz").shape
    assert unchanged(inp.parent, hashes) == []  # no input and no file of the user replaced


def test_overwrite_and_uneven_slices_only_when_asked(tmp_path, sample_dir, untrained):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_dicom_series(sample_dir / SLAB, inp / "gap", slices=[i for i in range(30) if i != 14])
    out.mkdir()
    (out / "gap_seg.nii.gz").write_bytes(b"an older result")
    args = {**SMALL, **LABEL_MAPS_ONLY, "ckpt_dir": untrained, "input_dir": str(inp), "output_dir": str(out)}
    proc = run_bundle(
        "inference", ["configs/inference.json"], {**args, "overwrite": True, "accept_uneven_slices": True}
    )
    text = proc.stdout + proc.stderr
    assert "6 mm between slice013.dcm and slice015.dcm" in text and "evenly spaced at 3.107 mm" in text
    assert "inference summary: 1 case(s): 1 written, 0 skipped (output exists), 0 failed" in text
    assert nib.load(out / "gap_seg.nii.gz").shape == (122, 101, 29)  # replaced, as asked

    # an output_dir that is a file is refused before anything runs, and the file is kept
    (tmp_path / "taken").write_text("a file", encoding="utf-8")
    proc = run_bundle(
        "inference", ["configs/inference.json"], {**args, "output_dir": str(tmp_path / "taken/seg")}, check=False
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"{tmp_path / 'taken'} is a file, not a folder" in text
    assert "Restored all variables" not in text and (tmp_path / "taken").read_text(encoding="utf-8") == "a file"


def test_msd_bad_case_in_worker_processes_is_named(tmp_path):
    """MSD inference loads in 2 worker processes (its default): a failed load still reaches the summary."""
    import torch
    from monai.networks.nets import SwinUNETR

    from bundles.msd_tasks import make_task

    task = make_task(tmp_path, "Task09_Spleen", cases=1, tests=2)
    (tmp_path / "models").mkdir()
    torch.save(SwinUNETR(in_channels=1, out_channels=2, feature_size=12).state_dict(), tmp_path / "models/model.pt")
    good, bad = sorted((task / "imagesTs").glob("*.nii.gz"))
    truncated(bad, bad)
    out = tmp_path / "seg"
    args = {
        **{k: SMALL[k] for k in ("feature_size", "amp", "sw_batch_size", "overlap")},
        "roi_size": [64, 64, 64],
        "pixdim": [3.0, 3.0, 3.0],
        "dataset_dir": str(task),
        "ckpt_dir": str(tmp_path / "models"),
        "input_dir": str(task / "imagesTs"),
        "output_dir": str(out),
        "preflight": False,
        **LABEL_MAPS_ONLY,
    }
    proc = run_bundle("inference", ["configs/inference.json"], args, cwd=REPO / "swin_unetr_msd", check=False)
    text = proc.stdout + proc.stderr
    assert (
        proc.returncode != 0 and "inference summary: 2 case(s): 1 written, 0 skipped (output exists), 1 failed" in text
    )
    assert f"FAILED: {bad}: " in text
    assert [p.name for p in out.iterdir()] == [good.name.replace(".nii.gz", "_seg.nii.gz")]


def test_weights_that_do_not_fit_are_named_in_one_line(tmp_path, sample_dir, untrained):
    """model.pt of another feature_size (no recipe to tell), or a truncated one: one line naming it and the fix.

    MONAI's CheckpointLoader answered the first with PyTorch's 678-line dump of mismatching tensors and
    the second with a bare EOFError / "failed finding central directory".
    """
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    shutil.copy(sample_dir / SLAB, inp / "a.nii.gz")
    model = Path(untrained) / "model.pt"
    before = sha256(model)
    builds_48 = {k: v for k, v in SMALL.items() if k != "feature_size"}  # the config's default, 48
    proc = run_bundle(
        "inference",
        ["configs/inference.json"],
        {**builds_48, **LABEL_MAPS_ONLY, "ckpt_dir": untrained, "input_dir": str(inp), "output_dir": str(out)},
        check=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{model} was trained with feature_size=12" in text and "--feature_size 12" in text, text[-3000:]
    assert "size mismatch for" not in text  # no dump of every tensor
    assert sha256(model) == before

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    truncated(model, damaged / "model.pt")
    proc = run_bundle(
        "inference",
        ["configs/inference.json"],
        {**SMALL, **LABEL_MAPS_ONLY, "ckpt_dir": str(damaged), "input_dir": str(inp), "output_dir": str(out)},
        check=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{damaged / 'model.pt'} is truncated or damaged" in text, text[-3000:]
    assert not out.exists() or not any(out.iterdir())
