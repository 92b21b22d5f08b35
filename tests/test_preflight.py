"""check_data: every data problem reported at once, each naming its file, before any model is built."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SMALL, run_bundle

from custom.preflight import DataCheck, DataCheckError


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
    cases.append({"image": "imagesTr/missing.nii.gz", "label": "labelsTr/good.nii.gz"})
    expect["image file not found"] = "imagesTr/missing.nii.gz"
    cases.append({"image": "../outside.nii.gz", "label": "labelsTr/good.nii.gz"})
    expect["leaves dataset_dir"] = "../outside.nii.gz"
    (d / "dataset_0.json").write_text(json.dumps({"training": cases, "validation": cases[:1]}))
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
    assert not [line for line in problem_lines if "good.nii.gz" in line.split(":")[0]]  # the good case is clean

    # training runs the same check first: it stops before building anything or writing a file
    proc = run_bundle("training", ["configs/train.json"], {**overrides, "max_epochs": 1}, check=False)
    assert proc.returncode != 0 and "check_data found" in proc.stdout + proc.stderr
    assert not ckpt.exists() and not out.exists()


def check(tmp_path, datalist_text: str | None) -> DataCheck:
    path = tmp_path / "dataset_0.json"
    if datalist_text is not None:
        path.write_text(datalist_text)
    return DataCheck(datalist=str(path), dataset_dir=str(tmp_path), num_classes=14)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "datalist not found"),
        ("{not json", "not valid JSON"),
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
    with caplog.at_level("INFO", logger="custom.preflight"):
        assert c.run() == 1
    assert "smaller than roi_size" in caplog.text and "zero-padded" in caplog.text
