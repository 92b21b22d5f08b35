"""check_data: every data problem reported at once, each naming its file, before any model is built."""

from __future__ import annotations

import json
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from helpers import CT_UID, LOCALIZER_UID, SMALL, run_bundle, truncated, write_dicom_series

from custom.data.cases import SKIPPED
from custom.data.preflight import DataCheck, DataCheckError


def save(path: Path, data: np.ndarray, affine=None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) * [2, 2, 2, 1] if affine is None else affine), str(path))
    return path.name


@pytest.fixture()
def broken_dataset(tmp_path) -> tuple[Path, dict[str, str]]:
    """One good case and one case per problem; returns the folder and problem -> file that must be named."""
    d = tmp_path / "data"
    img = np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32)
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[10:20, 10:20, 10:20] = 6
    cases, expect = [], {}

    def case(name, image=img, label=lab, image_affine=None, label_affine=None):
        save(d / f"imagesTr/{name}.nii.gz", image, image_affine)
        save(d / f"labelsTr/{name}.nii.gz", label, label_affine)
        cases.append({"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"})

    case("good")
    case("shape", label=lab[:, :, :30])
    expect["label shape"] = "labelsTr/shape.nii.gz"
    case("affine", label_affine=np.eye(4) * [2, 2, 2, 1] + np.array([[0, 0, 0, 5]] * 3 + [[0, 0, 0, 0]]))
    expect["label affine differs"] = "labelsTr/affine.nii.gz"
    bad_values = lab.copy()
    bad_values[0, 0, 0] = 14
    case("values", label=bad_values)
    expect["outside the bundle's classes 0..13"] = "labelsTr/values.nii.gz"
    nan_img = img.copy()
    nan_img[1, 2, 3] = np.nan
    case("nan", image=nan_img)
    expect["NaN or Inf"] = "imagesTr/nan.nii.gz"
    case("fraction", label=(lab * 0.25).astype(np.float32))
    expect["fractional values"] = "labelsTr/fraction.nii.gz"
    case("corrupt")
    raw = (d / "imagesTr/corrupt.nii.gz").read_bytes()
    (d / "imagesTr/corrupt.nii.gz").write_bytes(raw[: len(raw) // 3])  # truncated download
    expect["unreadable image"] = "imagesTr/corrupt.nii.gz"
    case("thin", image=img[:, :, :2], label=lab[:, :, :2])  # two slices: not a volume
    expect["a slice or a scout"] = "imagesTr/thin.nii.gz"
    case("corrupt_mha")  # formats ITK reads are read too
    itk.imwrite(itk.imread(str(d / "imagesTr/corrupt_mha.nii.gz")), str(d / "imagesTr/corrupt_mha.mha"))
    truncated(d / "imagesTr/corrupt_mha.mha", d / "imagesTr/corrupt_mha.mha")
    cases[-1]["image"] = "imagesTr/corrupt_mha.mha"
    expect["File cannot be read"] = "imagesTr/corrupt_mha.mha"
    case("good_nrrd")  # a readable .nrrd beside its NIfTI label: no problem
    itk.imwrite(itk.imread(str(d / "imagesTr/good_nrrd.nii.gz")), str(d / "imagesTr/good_nrrd.nrrd"))
    cases[-1]["image"] = "imagesTr/good_nrrd.nrrd"
    cases.append({"image": "imagesTr/missing.nii.gz", "label": "labelsTr/good.nii.gz"})
    expect["image file not found"] = "imagesTr/missing.nii.gz"
    cases.append({"image": "../outside.nii.gz", "label": "labelsTr/good.nii.gz"})
    expect["leaves dataset_dir"] = "../outside.nii.gz"
    (d / "dataset_0.json").write_text(json.dumps({"training": cases, "validation": cases[:1]}), encoding="utf-8")
    return d, expect


def test_check_data_command_lists_every_problem_and_writes_nothing(broken_dataset, tmp_path):
    d, expect = broken_dataset
    ckpt, out = tmp_path / "models", tmp_path / "outputs"
    overrides = {**SMALL, "dataset_dir": str(d), "ckpt_dir": str(ckpt), "output_dir": str(out)}
    proc = run_bundle("check_data", ["configs/train.json"], overrides, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"found {len(expect)} problem(s)" in text
    for problem, file in expect.items():
        assert any(problem in line and file in line for line in text.splitlines()), f"not reported: {problem} ({file})"
    problem_lines = text.split("problem(s) in")[1].split("Traceback")[0].splitlines()[1 : len(expect) + 1]
    assert len(problem_lines) == len(expect)
    assert not [line for line in problem_lines if "good" in line.split(":")[0]]  # the good cases are clean

    # training runs the same check first: it stops before building anything or writing a file
    proc = run_bundle("training", ["configs/train.json"], {**overrides, "max_epochs": 1}, check=False)
    assert proc.returncode != 0 and "check_data found" in proc.stdout + proc.stderr
    assert not ckpt.exists() and not out.exists()


def check(tmp_path, datalist_text: str | None) -> DataCheck:
    path = tmp_path / "dataset_0.json"
    if datalist_text is not None:
        path.write_text(datalist_text, encoding="utf-8")
    return DataCheck(datalist=str(path), dataset_dir=str(tmp_path), num_classes=14)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "datalist not found"),
        ("{not json", "not valid JSON"),
        ('["imagesTr/a.nii.gz"]', "expected a JSON object with a 'training' list, got list"),
        ('{"training": []}', "'training' must be a non-empty list"),
        ('{"validation": []}', "no 'training' list"),
        ('{"training": [{"label": "x.nii.gz"}]}', "has no 'image'"),
    ],
)
def test_datalist_problems(tmp_path, text, message):
    with pytest.raises(DataCheckError, match=message) as err:
        check(tmp_path, text).run()
    assert "dataset_0.json" in str(err.value)


def test_small_volume_is_noted_not_refused(tmp_path, caplog):
    save(tmp_path / "i.nii.gz", np.zeros((30, 30, 10), np.float32))
    save(tmp_path / "l.nii.gz", np.zeros((30, 30, 10), np.uint8))
    c = check(tmp_path, '{"training": [{"image": "i.nii.gz", "label": "l.nii.gz"}]}')
    with caplog.at_level("INFO", logger="custom.data.preflight"):
        assert c.run() == 1
    assert "smaller than roi_size" in caplog.text and "zero-padded" in caplog.text


def test_inference_inputs_of_every_format_are_read(tmp_path, sample_dir):
    """.mha, .nrrd and DICOM series are read like NIfTI; 2-D images, split or gapped series named; skipped not read."""
    slab = sample_dir / "ct_slab.nii.gz"
    itk.imwrite(itk.imread(str(slab)), str(tmp_path / "good.mha"))
    itk.imwrite(itk.imread(str(slab)), str(tmp_path / "good.nrrd"))
    truncated(tmp_path / "good.mha", tmp_path / "truncated.mha")
    save(tmp_path / "flat.nii.gz", np.zeros((40, 40), np.float32))
    itk.imwrite(itk.image_from_array(np.zeros((40, 40), np.int16)), str(tmp_path / "flat.mha"))
    write_dicom_series(slab, tmp_path / "dicom")
    write_dicom_series(slab, tmp_path / "two")
    write_dicom_series(slab, tmp_path / "two", LOCALIZER_UID, range(10), prefix="loc")
    write_dicom_series(slab, tmp_path / "gap", slices=[i for i in range(30) if i not in (3, 4)])
    names = ["good.mha", "good.nrrd", "dicom", "truncated.mha", "flat.nii.gz", "flat.mha", "two", "gap"]
    items = [{"image": str(tmp_path / n)} for n in names] + [{"image": str(tmp_path / "gone.mha"), SKIPPED: "x"}]

    def problems(**kwargs) -> list[str]:
        c = DataCheck(
            None, str(tmp_path), 14, (64, 64, 64), (3.0, 3.0, 3.0), require_labels=False, items=items, **kwargs
        )
        with pytest.raises(DataCheckError):
            c.run()
        return c.problems

    found = problems()
    assert [p.split(":")[0] for p in found] == [str(tmp_path / n) for n in names[3:]]  # the good ones pass
    assert "unreadable image" in found[0] and "corrupt or truncated" in found[0]
    assert "a 2-D image (shape (40, 40))" in found[1] and "a 2-D image" in found[2]
    assert f"holds 2 DICOM series: SeriesInstanceUID {CT_UID} (30 files); SeriesInstanceUID {LOCALIZER_UID}" in found[3]
    assert "9 mm between slice002.dcm and slice005.dcm (about 2 slice(s) missing)" in found[4]
    assert [p.split(":")[0] for p in problems(accept_uneven_slices=True)] == [str(tmp_path / n) for n in names[3:7]]
