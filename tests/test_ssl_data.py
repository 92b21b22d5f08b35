"""SSL corpus: datalists, one-time preprocessing to .npy, and memory-mapped crops, on tiny synthetic CTs."""

from __future__ import annotations

import gzip
import json
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom.data.ssl_dataset import MemmapCropDataset
from custom.data.ssl_preprocess import CorpusError, load_ssl_datalists, preprocess_corpus
from custom.tools.ssl_corpus import main

ROI = (16, 16, 16)
#: the body (HU > -1000) inside each 40 x 36 x 30 test volume; the rest is air
BODY = (slice(5, 35), slice(4, 30), slice(3, 27))


def _ct(path: Path, shape=(40, 36, 30), body=BODY, seed: int = 0, affine=None) -> Path:
    """int16 HU volume, 2 mm voxels: air (-1000) around a block of tissue (-900..1200 HU, some clipped)."""
    rng = np.random.default_rng(seed)
    data = np.full(shape, -1000, dtype=np.int16)
    data[body] = rng.integers(-900, 1200, size=data[body].shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def _datalist(path: Path, training: list, validation: list | None = None) -> Path:
    content = {"training": training}
    if validation is not None:
        content["validation"] = validation
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


@pytest.fixture
def dataset(tmp_path) -> Path:
    """imagesTr/ct0..ct2 (training), imagesTs/ct3 (validation), and datalist.json; returns the folder."""
    for i in range(3):
        _ct(tmp_path / "imagesTr" / f"ct{i}.nii.gz", seed=i)
    _ct(tmp_path / "imagesTs" / "ct3.nii.gz", seed=3)
    training = [{"image": f"imagesTr/ct{i}.nii.gz", "label": f"labelsTr/ct{i}.nii.gz"} for i in range(3)]
    _datalist(tmp_path / "datalist.json", training, [{"image": "imagesTs/ct3.nii.gz"}])
    return tmp_path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A preprocessed corpus (uint8, ROI 16^3) of 3 training and 1 validation volumes; returns index.json."""
    root = tmp_path_factory.mktemp("ssl_corpus")
    for i in range(4):
        _ct(root / f"ct{i}.nii.gz", seed=i)
    _datalist(root / "dl.json", [f"ct{i}.nii.gz" for i in range(3)], ["ct3.nii.gz"])
    return preprocess_corpus(root / "dl.json", root, root / "out", roi_size=ROI)


# -- datalists ------------------------------------------------------------------------------------
def test_datalists_combine_and_ignore_labels(tmp_path):
    training = [{"image": "x/a.nii.gz", "label": "y/a.nii.gz"}, "x/b.nii.gz"]
    a = _datalist(tmp_path / "a.json", training, [{"image": "v.nii"}])
    b = _datalist(tmp_path / "b.json", [{"image": "/abs/c.nii.gz"}])
    c = tmp_path / "c.json"
    c.write_text(
        json.dumps({"validation": ["w.nii.gz"]}), encoding="utf-8"
    )  # no training section: contributes nothing there
    assert load_ssl_datalists([a, b, c], "/data") == [
        {"image": "/data/x/a.nii.gz"},
        {"image": "/data/x/b.nii.gz"},
        {"image": "/abs/c.nii.gz"},
    ]
    assert load_ssl_datalists([a, c], "/data", section="validation") == [
        {"image": "/data/v.nii"},
        {"image": "/data/w.nii.gz"},
    ]
    assert load_ssl_datalists(str(b), "/data") == [{"image": "/abs/c.nii.gz"}]


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "datalist not found"),
        ("{not json", "not valid JSON"),
        (json.dumps({"validation": ["a.nii.gz"]}), "no image in section 'training'"),
        (json.dumps({"training": [{"label": "a.nii.gz"}]}), r"training\[0\] must be"),
        (json.dumps({"training": "a.nii.gz"}), "must be a list"),
        (json.dumps(["a.nii.gz"]), "expected a JSON object"),
    ],
)
def test_datalist_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        load_ssl_datalists(path, tmp_path)
    assert str(path) in str(err.value)


# -- preprocessing --------------------------------------------------------------------------------
def test_preprocess_stores_cropped_volumes_and_index(dataset):
    index_file = preprocess_corpus(dataset / "datalist.json", dataset, dataset / "corpus", roi_size=ROI)
    assert index_file == dataset / "corpus" / "index.json"
    index = json.loads(index_file.read_text(encoding="utf-8"))
    assert index["settings"] == {
        "format_version": 1,
        "dtype": "uint8",
        "scale": 255.0,
        "intensity_range": [-1000.0, 1000.0],
        "pixdim": None,
        "roi_size": list(ROI),
    }
    assert index["complete"] is True
    vols = index["volumes"]
    assert [v["section"] for v in vols] == ["training"] * 3 + ["validation"]
    assert [Path(v["source"]).name for v in vols] == [f"ct{i}.nii.gz" for i in range(4)]
    assert len({v["file"] for v in vols}) == 4
    body_shape = [1] + [s.stop - s.start for s in BODY]
    for v in vols:
        arr = np.load(index_file.parent / v["file"])
        assert arr.dtype == np.uint8 and list(arr.shape) == v["shape"] == body_shape  # the air border is gone
        for axis in range(1, 4):  # tissue reaches every face of the stored box
            assert arr.take(0, axis=axis).any() and arr.take(-1, axis=axis).any()


def test_an_image_listed_twice_is_stored_once_under_its_first_section(dataset, caplog):
    twice = ["imagesTr/ct0.nii.gz", str(dataset / "imagesTr" / "ct0.nii.gz")]  # relative and absolute
    _datalist(dataset / "dl.json", twice, ["imagesTr/ct0.nii.gz", "imagesTs/ct3.nii.gz"])
    with caplog.at_level("WARNING", logger="custom.data.ssl_preprocess"):
        index_file = preprocess_corpus(dataset / "dl.json", dataset, dataset / "corpus", roi_size=ROI)
    index = json.loads(index_file.read_text(encoding="utf-8"))
    assert [(Path(v["source"]).name, v["section"]) for v in index["volumes"]] == [
        ("ct0.nii.gz", "training"),
        ("ct3.nii.gz", "validation"),
    ]
    assert index["complete"] is True
    assert (
        f"{dataset / 'dl.json'}: 1 of 2 image(s) of section 'validation' are also listed in 'training'" in caplog.text
    )


def test_validation_made_only_of_training_images_is_refused_naming_the_datalist(dataset):
    """Issue 17 item 7: was accepted here, then training failed at start naming the corpus index."""
    training = [f"imagesTr/ct{i}.nii.gz" for i in range(3)]
    dl = _datalist(dataset / "dl.json", training, training[:2])
    with pytest.raises(
        ValueError, match=r"every image of section 'validation' \(2\) is also listed in 'training'"
    ) as e:
        preprocess_corpus(dl, dataset, dataset / "corpus", roi_size=ROI)
    assert str(e.value).startswith(f"{dl}: ") and "nothing is held out" in str(e.value)
    assert "move some volumes" in str(e.value)
    assert not (dataset / "corpus").exists()  # said before anything is stored


def test_small_volume_is_padded_to_the_roi(tmp_path):
    _ct(tmp_path / "small.nii.gz", shape=(12, 10, 20), body=(slice(2, 10), slice(1, 9), slice(0, 20)))
    _datalist(tmp_path / "dl.json", ["small.nii.gz"])
    index = json.loads(
        preprocess_corpus(tmp_path / "dl.json", tmp_path, tmp_path / "out", roi_size=ROI).read_text(encoding="utf-8")
    )
    (vol,) = index["volumes"]
    assert vol["shape"] == [1, 16, 16, 20]
    arr = np.load(tmp_path / "out" / vol["file"])
    assert arr[0, :4].max() == 0 and arr[0, 4:12, 4:12].all()  # body of 8 x 8 centred, zeros around


@pytest.mark.parametrize("dtype, tol", [("uint8", 1 / 255), ("float16", 1e-3)])
@pytest.mark.parametrize("pixdim", [None, (3.0, 2.5, 4.0)])
def test_stored_volume_matches_monai_chain_in_memory(tmp_path, dtype, tol, pixdim):
    from monai.transforms import (
        Compose,
        CropForeground,
        LoadImage,
        Orientation,
        ScaleIntensityRange,
        Spacing,
        SpatialPad,
    )

    lps = np.diag([-2.0, -2.0, 2.0, 1.0])  # stored LPS: Orientation("RAS") must flip it
    src = _ct(tmp_path / "ct.nii.gz", shape=(24, 22, 20), body=(slice(3, 21), slice(2, 20), slice(1, 19)), affine=lps)
    _datalist(tmp_path / "dl.json", ["ct.nii.gz"])
    index_file = preprocess_corpus(
        tmp_path / "dl.json", tmp_path, tmp_path / "out", pixdim=pixdim, roi_size=ROI, dtype=dtype
    )
    vol = json.loads(index_file.read_text(encoding="utf-8"))["volumes"][0]
    stored = np.load(tmp_path / "out" / vol["file"]).astype(np.float32) / (255.0 if dtype == "uint8" else 1.0)
    chain = [LoadImage(image_only=True, ensure_channel_first=True), Orientation(axcodes="RAS")]
    chain += [Spacing(pixdim=pixdim)] if pixdim else []
    chain += [ScaleIntensityRange(-1000, 1000, 0.0, 1.0, clip=True), CropForeground(), SpatialPad(ROI)]
    ref = Compose(chain)(str(src)).numpy()
    assert stored.shape == ref.shape
    assert np.abs(stored - ref).max() <= tol + 1e-6


def test_resume_skips_stored_volumes_and_refuses_other_settings(dataset):
    args = (dataset / "datalist.json", dataset, dataset / "corpus")
    index_file = preprocess_corpus(*args, roi_size=ROI)
    index = json.loads(index_file.read_text(encoding="utf-8"))
    files = [index_file.parent / v["file"] for v in index["volumes"]]
    mtimes = [f.stat().st_mtime_ns for f in files]
    # what a run killed after its first volumes leaves: the settings, no volume list yet
    index_file.write_text(json.dumps({**index, "volumes": [], "complete": False}), encoding="utf-8")
    files[1].unlink()
    assert preprocess_corpus(*args, roi_size=ROI) == index_file
    assert json.loads(index_file.read_text(encoding="utf-8")) == index
    assert [f.stat().st_mtime_ns for i, f in enumerate(files) if i != 1] == [m for i, m in enumerate(mtimes) if i != 1]

    with pytest.raises(ValueError, match=r"other settings \(dtype: 'uint8' -> 'float16'\).*overwrite") as err:
        preprocess_corpus(*args, roi_size=ROI, dtype="float16")
    assert str(index_file) in str(err.value)
    with pytest.raises(ValueError, match=r"roi_size: \[16, 16, 16\] -> \[16, 16, 24\]"):
        preprocess_corpus(*args, roi_size=(16, 16, 24))
    assert json.loads(index_file.read_text(encoding="utf-8")) == index  # refused runs change nothing

    new = json.loads(
        preprocess_corpus(*args, roi_size=ROI, dtype="float16", overwrite=True).read_text(encoding="utf-8")
    )
    assert new["settings"]["dtype"] == "float16" and len(new["volumes"]) == 4
    assert not any(f.exists() for f in files)  # the uint8 volumes were replaced, not left behind
    assert sorted(p.name for p in (dataset / "corpus" / "volumes").iterdir()) == sorted(
        Path(v["file"]).name for v in new["volumes"]
    )


def test_unreadable_images_are_listed_and_the_rest_indexed(dataset):
    good = (dataset / "imagesTr" / "ct1.nii.gz").read_bytes()
    (dataset / "imagesTr" / "ct1.nii.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    blank = dataset / "imagesTr" / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), -1024, np.int16), np.eye(4)), str(blank))
    training = ["imagesTr/ct0.nii.gz", "imagesTr/ct1.nii.gz", "imagesTr/missing.nii.gz", "imagesTr/blank.nii.gz"]
    _datalist(dataset / "dl.json", training, ["imagesTs/ct3.nii.gz"])
    with pytest.raises(CorpusError, match="3 of 5 image") as err:
        preprocess_corpus(dataset / "dl.json", dataset, dataset / "corpus", roi_size=ROI)
    lines = str(err.value).splitlines()[1:]
    assert [line.split(": ")[0].strip() for line in lines] == [
        str(dataset / "imagesTr" / name) for name in ("ct1.nii.gz", "missing.nii.gz", "blank.nii.gz")
    ]
    assert "EOFError" in lines[0] and "FileNotFoundError" in lines[1] and "window minimum" in lines[2]
    index = json.loads((dataset / "corpus" / "index.json").read_text(encoding="utf-8"))
    assert index["complete"] is False
    assert [Path(v["source"]).name for v in index["volumes"]] == ["ct0.nii.gz", "ct3.nii.gz"]


def test_interrupted_run_keeps_what_is_done(dataset, monkeypatch):
    import custom.data.ssl_preprocess as ssl_data

    real, calls = ssl_data._preprocess_one, []

    def interrupted_at_the_third(*args):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    args = (dataset / "datalist.json", dataset, dataset / "corpus")
    monkeypatch.setattr(ssl_data, "_preprocess_one", interrupted_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        preprocess_corpus(*args, roi_size=ROI)
    index = json.loads((dataset / "corpus" / "index.json").read_text(encoding="utf-8"))
    assert index["complete"] is False
    assert [Path(v["source"]).name for v in index["volumes"]] == ["ct0.nii.gz", "ct1.nii.gz"]

    monkeypatch.setattr(ssl_data, "_preprocess_one", lambda *a: calls.append(a[0]) or real(*a))
    calls.clear()
    index = json.loads(preprocess_corpus(*args, roi_size=ROI).read_text(encoding="utf-8"))
    assert index["complete"] is True and len(index["volumes"]) == 4
    assert [Path(c).name for c in calls] == ["ct2.nii.gz", "ct3.nii.gz"]  # only the ones not stored yet


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "int8"}, "dtype 'int8' is not supported"),
        ({"roi_size": (16, 16)}, "roi_size must be 3 positive integers"),
        ({"intensity_range": (1000, -1000)}, "low < high"),
        ({"pixdim": (1.5, -1.0, 2.0)}, "pixdim must be None or 3 positive"),
        ({"sections": "training"}, "sections must be a non-empty list"),
    ],
)
def test_preprocess_ill_args(dataset, kwargs, match):
    with pytest.raises(ValueError, match=match):
        preprocess_corpus(dataset / "datalist.json", dataset, dataset / "corpus", **kwargs)
    assert not (dataset / "corpus").exists()


# -- dataset --------------------------------------------------------------------------------------
def test_crops_have_roi_shape_and_come_from_the_stored_volume(corpus):
    ds = MemmapCropDataset(corpus, roi_size=(16, 12, 8), num_samples=3, deterministic=True)
    assert len(ds) == 3 and ds.settings["roi_size"] == list(ROI) and ds.settings["dtype"] == "uint8"
    for i in range(len(ds)):
        arr = np.load(corpus.parent / ds.volumes[i]["file"]).astype(np.float32) / 255
        items = ds[i]
        assert len(items) == 3
        for (x, y, z), item in zip(ds.corners(i).tolist(), items, strict=True):
            crop = item["image"]
            assert crop.dtype == torch.float32 and tuple(crop.shape) == (1, 16, 12, 8)
            assert 0.0 <= crop.min() and crop.max() <= 1.0
            np.testing.assert_array_equal(crop.numpy(), arr[:, x : x + 16, y : y + 12, z : z + 8])


def test_deterministic_mode_repeats_and_random_mode_varies(corpus):
    fixed = MemmapCropDataset(corpus, roi_size=ROI, num_samples=2, deterministic=True, seed=7)
    again = MemmapCropDataset(corpus, roi_size=ROI, num_samples=2, deterministic=True, seed=7)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(fixed[1], again[1], strict=True))
    other = MemmapCropDataset(corpus, roi_size=ROI, deterministic=True, seed=8)
    assert not torch.equal(fixed.corners(1), other.corners(1)) or not torch.equal(fixed.corners(2), other.corners(2))

    rand = MemmapCropDataset(corpus, roi_size=ROI, num_samples=2)
    draws = {tuple(rand.corners(0).flatten().tolist()) for _ in range(10)}
    assert len(draws) > 1  # 15 x 11 x 9 positions: ten draws do not all coincide
    torch.manual_seed(3)
    first = rand[0]
    torch.manual_seed(3)
    # torch's RNG drives it
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, rand[0], strict=True))


def test_dataloader_workers_flatten_samples_into_the_batch(corpus):
    from monai.data import DataLoader
    from monai.utils import set_determinism

    ds = MemmapCropDataset(corpus, roi_size=ROI, num_samples=2)
    ds[0]  # a map opened here must not travel into the workers
    assert len(ds._maps) == 1 and not pickle.loads(pickle.dumps(ds))._maps
    batches = []
    for _ in range(2):
        set_determinism(seed=0)
        loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
        batches.append([b["image"] for b in loader])
    set_determinism(seed=None)
    assert [tuple(b.shape) for b in batches[0]] == [(4, 1, *ROI), (2, 1, *ROI)]
    assert all(torch.equal(a, b) for a, b in zip(*batches, strict=True))  # reproducible under set_determinism
    assert all(b.dtype == torch.float32 and 0 <= b.min() and b.max() <= 1 for b in batches[0])


def test_open_memory_maps_are_bounded(corpus):
    ds = MemmapCropDataset(corpus, roi_size=ROI, max_open_files=2)
    for i in (0, 1, 0, 2):
        ds[i]
    assert list(ds._maps) == [0, 2]  # least recently used (1) closed first


def test_dataset_errors_name_the_index_and_section(corpus, tmp_path):
    with pytest.raises(ValueError, match="no volume in section 'testing'") as err:
        MemmapCropDataset(corpus, section="testing", roi_size=ROI)
    assert str(corpus) in str(err.value) and "'training': 3" in str(err.value)
    assert str(corpus.parent.parent / "dl.json") in str(err.value)  # the datalist to edit
    with pytest.raises(ValueError, match=r"smaller than roi_size \[32, 16, 16\].*re-run preprocess_corpus"):
        MemmapCropDataset(corpus, roi_size=(32, 16, 16))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        MemmapCropDataset(corpus, roi_size=ROI, num_samples=0)
    bad = tmp_path / "index.json"
    bad.write_text(json.dumps({"volumes": []}), encoding="utf-8")
    with pytest.raises(ValueError, match="not a corpus index"):
        MemmapCropDataset(bad)
    assert len(MemmapCropDataset(corpus, section="validation", roi_size=ROI)) == 1
    with pytest.raises(IndexError):
        MemmapCropDataset(corpus, roi_size=ROI)[3]


# -- command line ---------------------------------------------------------------------------------
def test_cli_writes_the_corpus_and_reports_errors(dataset, capsys):
    out = dataset / "corpus"
    args = ["--datalist", str(dataset / "datalist.json"), "--dataset_dir", str(dataset), "--out_dir", str(out)]
    assert main(args + ["--roi_size", "16", "16", "16", "--dtype", "float16"]) == 0
    assert "4 volume(s) {'training': 3, 'validation': 1}" in capsys.readouterr().out
    assert json.loads((out / "index.json").read_text(encoding="utf-8"))["settings"]["dtype"] == "float16"

    assert main(args + ["--roi_size", "16", "16", "16"]) == 1  # uint8 into a float16 corpus
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out / "index.json") in err and "--overwrite" in err

    with gzip.open(dataset / "imagesTs" / "ct3.nii.gz", "rb") as f:
        header_only = f.read(352)
    (dataset / "imagesTs" / "ct3.nii.gz").write_bytes(gzip.compress(header_only))
    assert main(args + ["--roi_size", "16", "16", "16", "--overwrite"]) == 1
    assert str(dataset / "imagesTs" / "ct3.nii.gz") in capsys.readouterr().err


def test_module_runs_as_a_command(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "custom.tools.ssl_corpus",
            "--datalist",
            str(tmp_path / "nope.json"),
            "--dataset_dir",
            ".",
        ]
        + ["--out_dir", str(tmp_path / "out")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and f"error: {tmp_path / 'nope.json'}: datalist not found" in proc.stderr


# -- parallel and sharded preprocessing (issue 17 item 9) -----------------------------------------
def _stored(index_file: Path) -> tuple[dict, dict[str, bytes]]:
    """The index and the bytes of every stored volume, by file name."""
    index = json.loads(index_file.read_text(encoding="utf-8"))
    return index, {p.name: p.read_bytes() for p in sorted((index_file.parent / "volumes").iterdir())}


def test_two_workers_give_the_same_index_and_files_as_one(dataset):
    one = preprocess_corpus(dataset / "datalist.json", dataset, dataset / "one", roi_size=ROI, workers=1)
    two = preprocess_corpus(dataset / "datalist.json", dataset, dataset / "two", roi_size=ROI, workers=2)
    index, files = _stored(one)
    assert len(files) == 4 and index["complete"] is True
    assert _stored(two) == (index, files)


def test_two_shards_then_a_merge_equal_one_run_and_the_index_is_merged_once(dataset, monkeypatch, capsys):
    import custom.data.ssl_preprocess as ssl_data

    one = preprocess_corpus(dataset / "datalist.json", dataset, dataset / "one", roi_size=ROI)
    out = dataset / "sharded"
    args = ["--datalist", str(dataset / "datalist.json"), "--dataset_dir", str(dataset), "--out_dir", str(out)]
    args += ["--roi_size", "16", "16", "16"]
    real, written = ssl_data._write_index, []
    monkeypatch.setattr(ssl_data, "_write_index", lambda path, *a, **k: written.append(path) or real(path, *a, **k))

    assert main(args + ["--shard", "0/2"]) == 0
    assert "2 volume(s) {'training': 2}" in capsys.readouterr().out  # positions 0 and 2 of 4
    assert main(["--out_dir", str(out), "--merge"]) == 1  # shard 1 has not run: no index
    assert "shard(s) 1/2 have not run" in capsys.readouterr().err and not (out / "index.json").exists()
    assert main(args + ["--shard", "1/2", "--workers", "2"]) == 0
    assert not (out / "index.json").exists()  # shards write only their parts
    assert main(["--out_dir", str(out), "--merge"]) == 0
    assert "4 volume(s) {'training': 3, 'validation': 1}" in capsys.readouterr().out
    assert written.count(out / "index.json") == 1
    assert _stored(out / "index.json") == _stored(one)

    assert main(args + ["--shard", "2/2"]) == 1
    assert "need 0 <= i < n" in capsys.readouterr().err


def test_a_resumed_shard_does_not_redo_finished_volumes(dataset, monkeypatch):
    import custom.data.ssl_preprocess as ssl_data

    real, calls = ssl_data._preprocess_one, []

    def interrupted_at_the_second(*args):
        calls.append(Path(args[0]).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    args = (dataset / "datalist.json", dataset, dataset / "corpus")
    monkeypatch.setattr(ssl_data, "_preprocess_one", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        preprocess_corpus(*args, roi_size=ROI, shard="0/2")
    part_file = dataset / "corpus" / "parts" / "shard-0-of-2.json"
    part = json.loads(part_file.read_text(encoding="utf-8"))
    assert part["complete"] is False and [Path(v["source"]).name for v in part["volumes"]] == ["ct0.nii.gz"]

    calls.clear()
    monkeypatch.setattr(ssl_data, "_preprocess_one", lambda *a: calls.append(Path(a[0]).name) or real(*a))
    assert preprocess_corpus(*args, roi_size=ROI, shard="0/2") == part_file
    assert calls == ["ct2.nii.gz"]  # ct0 was finished before the interruption
    part = json.loads(part_file.read_text(encoding="utf-8"))
    assert part["complete"] is True and [v["pos"] for v in part["volumes"]] == [0, 2]

    with pytest.raises(ValueError, match=r"shard-0-of-2.json was made with other settings \(dtype"):
        preprocess_corpus(*args, roi_size=ROI, dtype="float16", shard="0/2")


# -- the bundle's train workflow on a fresh data folder (issue 17 item 7) -------------------------
def test_ssl_train_workflow_initialises_on_a_fresh_data_folder(dataset, tmp_path):
    """Was: train#dataset read a corpus index that only the `training` run list built, so it failed here."""
    from monai.bundle import ConfigWorkflow
    from monai.utils import set_determinism

    bundle = Path(__file__).resolve().parents[1] / "swin_unetr_ssl"
    work = tmp_path / "work"
    wf = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(bundle),
        dataset_dir=str(dataset),
        datalist=[str(dataset / "datalist.json")],
        cache_dir=str(work / "cache"),
        ckpt_dir=str(work / "models"),
        output_dir=str(work / "outputs"),
        feature_size=12,
        roi_size=[64, 64, 64],
        num_workers=0,
        batch_size=1,
        amp=False,
        use_checkpoint=False,
    )
    try:
        wf.initialize()
        assert wf.check_properties() == []
    finally:
        set_determinism(seed=None)
    index = json.loads((work / "cache" / "index.json").read_text(encoding="utf-8"))  # built by the dataset itself
    assert index["complete"] is True and len(index["volumes"]) == 4
    assert len(wf.train_dataset) == 3 and wf.train_dataset.index_file == work / "cache" / "index.json"


def _corpus_on_rank(rank: int, init_file: str, runs: dict, results: dict) -> None:
    import torch.distributed as dist

    from custom.data.ssl_preprocess import Corpus

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for name, kwargs in runs.items():
            corpus = Corpus(**kwargs)
            try:
                results[rank, name] = ("ok", str(corpus()), str(corpus()))  # the second call: no collective
            except Exception as e:
                results[rank, name] = ("error", type(e).__name__, str(e))
        dist.barrier()  # leave together: a peer gone mid-teardown can abort gloo
    finally:
        dist.destroy_process_group()


def test_corpus_is_built_by_rank_0_and_handed_to_every_rank(dataset, tmp_path):
    """multi_gpu_train.json calls prepare_corpus on every rank: rank 0 builds, the others get its path or its error."""
    ctx = torch.multiprocessing.get_context("spawn")  # gloo in a process forked from a threaded one can hang
    common = {"dataset_dir": str(dataset), "roi_size": ROI}
    runs = {
        "good": {**common, "datalists": str(dataset / "datalist.json"), "out_dir": str(tmp_path / "good")},
        "bad": {**common, "datalists": str(tmp_path / "missing.json"), "out_dir": str(tmp_path / "bad")},
    }
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=_corpus_on_rank, args=(r, str(tmp_path / "init"), runs, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    index = str(tmp_path / "good" / "index.json")
    assert results[0, "good"] == results[1, "good"] == ("ok", index, index)
    assert len(json.loads(Path(index).read_text(encoding="utf-8"))["volumes"]) == 4
    assert results[0, "bad"][:2] == ("error", "FileNotFoundError") and "missing.json" in results[0, "bad"][2]
    assert results[1, "bad"][:2] == ("error", "RuntimeError") and "rank 0 could not prepare" in results[1, "bad"][2]
    assert "missing.json: datalist not found" in results[1, "bad"][2]


def test_an_index_file_given_on_the_command_line_is_used_as_is(corpus, tmp_path):
    """``--index_file`` (a corpus stored elsewhere): the `training` list stores nothing into ``cache_dir``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "swin_unetr_ssl" / "configs" / "train.json"))
    parser.update({"index_file": str(corpus), "cache_dir": str(tmp_path / "cache"), "roi_size": list(ROI)})
    step = parser["training"].index("$@index_file")  # by what it is, not by its position in the list
    assert parser.get_parsed_content(f"training#{step}") == str(corpus)
    assert len(parser.get_parsed_content("validate#dataset")) == 1 and not (tmp_path / "cache").exists()
