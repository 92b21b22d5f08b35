"""The paper's protocol pieces (issue 15): folds, metrics, post-processing, ensemble + TTA, cv_summary.

CPU, tiny arrays and networks; each test asserts a behaviour a user relies on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom.inference.ensemble import ALL_FLIPS, EnsemblePredictor, ensemble_predictor, load_ensemble, tta_flips
from custom.segmentation.cv_summary import cv_summary
from custom.segmentation.folds import (
    SplitsError,
    case_id,
    decathlon_cases,
    decathlon_fold_datalist,
    fold_ckpt_dir,
    fold_datalist,
    fold_weight_files,
    round_robin_splits,
)
from custom.segmentation.metrics import case_metrics, summarize, summary_markdown
from custom.segmentation.postprocess import (
    KeepLargestComponentsd,
    PostprocessingError,
    decide_largest_component,
    write_decision,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- folds


def _cases(root: Path, n: int) -> list[dict]:
    return [
        {"image": str(root / f"imagesTr/img{i:04d}.nii.gz"), "label": str(root / f"labelsTr/label{i:04d}.nii.gz")}
        for i in range(1, n + 1)
    ]


def test_folds_are_disjoint_covering_and_written_once(tmp_path):
    cases, splits = _cases(tmp_path, 11), tmp_path / "out" / "splits_final.json"
    vals = [fold_datalist(cases, splits, 5, f, "validation", tmp_path) for f in range(5)]
    trains = [fold_datalist(cases, splits, 5, f, "training", tmp_path) for f in range(5)]
    images = {c["image"] for c in cases}
    val_images = [c["image"] for v in vals for c in v]
    assert sorted(val_images) == sorted(images)  # every case held out exactly once
    for v, t in zip(vals, trains, strict=True):
        assert {c["image"] for c in t} == images - {c["image"] for c in v}
    assert [len(v) for v in vals] == [3, 2, 2, 2, 2]
    saved = json.loads(splits.read_text(encoding="utf-8"))
    assert saved["num_folds"] == 5 and saved["cases"] == 11 and len(saved["fingerprint"]) == 64
    assert saved["splits"][0]["val"] == [
        "imagesTr/img0001.nii.gz",
        "imagesTr/img0006.nii.gz",
        "imagesTr/img0011.nii.gz",
    ]
    # a later run, cases in another order: the file is read back, not rewritten, and gives the same folds
    mtime = splits.stat().st_mtime_ns
    again = fold_datalist(list(reversed(cases)), splits, 5, 2, "validation", tmp_path)
    assert again == vals[2] and splits.stat().st_mtime_ns == mtime
    assert not list(splits.parent.glob(".*.tmp"))


def test_a_hand_edited_split_is_honoured(tmp_path):
    cases, splits = _cases(tmp_path, 4), tmp_path / "splits_final.json"
    ids = [case_id(c, tmp_path) for c in cases]
    custom = [{"train": ids[2:], "val": ids[:2]}, {"train": ids[:2], "val": ids[2:]}]
    splits.write_text(json.dumps({"splits": custom}), encoding="utf-8")
    assert [c["image"] for c in fold_datalist(cases, splits, 2, 0, "validation", tmp_path)] == [
        cases[0]["image"],
        cases[1]["image"],
    ]
    custom[1]["val"] = ids[3:]  # case 3 held out nowhere
    splits.write_text(json.dumps({"splits": custom}), encoding="utf-8")
    with pytest.raises(SplitsError, match="exactly once"):
        fold_datalist(cases, splits, 2, 0, "validation", tmp_path)


def test_a_changed_datalist_is_refused_by_name(tmp_path):
    cases, splits = _cases(tmp_path, 6), tmp_path / "splits_final.json"
    fold_datalist(cases, splits, 3, 0, "training", tmp_path)
    before = splits.read_text(encoding="utf-8")
    added = cases + _cases(tmp_path, 7)[6:]
    with pytest.raises(SplitsError) as e:
        fold_datalist(added, splits, 3, 0, "training", tmp_path)
    msg = str(e.value)
    assert str(splits) in msg and "imagesTr/img0007.nii.gz" in msg and "1 case(s) not in the file" in msg
    assert f"delete {splits}" in msg and "new path" in msg
    with pytest.raises(SplitsError, match=r"missing from the datalist \(imagesTr/img0003.nii.gz\)"):
        fold_datalist(cases[:2] + cases[3:], splits, 3, 0, "training", tmp_path)
    with pytest.raises(SplitsError, match="holds 3 folds but num_folds is 5"):
        fold_datalist(cases, splits, 5, 0, "training", tmp_path)
    assert splits.read_text(encoding="utf-8") == before  # nothing re-split, nothing overwritten


_RANK_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
from custom.segmentation.folds import fold_datalist
cases = json.loads(sys.argv[1])
out = [[c["image"] for c in fold_datalist(cases, sys.argv[2], 3, f, "validation", sys.argv[3])] for f in range(3)]
print(json.dumps(out))
"""


def _rank_run(rank: int, cases: list, splits: Path, root: Path, hashseed: str) -> list:
    env = {**os.environ, "RANK": str(rank), "PYTHONHASHSEED": hashseed}
    script = _RANK_SCRIPT.format(repo=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases), str(splits), str(root)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_folds_are_the_same_on_every_rank_and_run(tmp_path):
    cases, splits = _cases(tmp_path, 8), tmp_path / "splits_final.json"
    rank1 = _rank_run(1, cases, splits, tmp_path, "1")  # rank 1 first: computes the split, writes nothing
    assert not splits.exists()
    rank0 = _rank_run(0, list(reversed(cases)), splits, tmp_path, "2")  # another hash seed and order
    assert splits.is_file() and rank0 == rank1
    assert _rank_run(1, cases, splits, tmp_path, "3") == rank0  # rank 1 later reads the file back


def test_decathlon_fold_datalist_keeps_the_published_split_without_a_fold(tmp_path):
    from monai.data import load_decathlon_datalist

    items = [{"image": f"imagesTr/img{i}.nii.gz", "label": f"labelsTr/label{i}.nii.gz"} for i in range(5)]
    datalist = tmp_path / "dataset_0.json"
    datalist.write_text(json.dumps({"training": items[:3], "validation": items[3:]}), encoding="utf-8")
    assert decathlon_fold_datalist(datalist, tmp_path, "validation") == load_decathlon_datalist(
        str(datalist), True, "validation", base_dir=str(tmp_path)
    )
    splits = tmp_path / "models" / "splits_final.json"
    val = decathlon_fold_datalist(datalist, tmp_path, "validation", 5, 4, splits)
    assert [case_id(c, tmp_path) for c in val] == ["imagesTr/img4.nii.gz"]  # pooled: the validation cases too
    assert json.loads(splits.read_text(encoding="utf-8"))["cases"] == 5
    with pytest.raises(SplitsError, match="splits_file"):
        decathlon_fold_datalist(datalist, tmp_path, "training", 5, 0, None)
    datalist.write_text(
        json.dumps({"training": items, "validation": items[:1]}), encoding="utf-8"
    )  # one case in both sections
    assert len(decathlon_cases(datalist, tmp_path)) == 5
    datalist.write_text(
        json.dumps({"training": items, "validation": [{**items[0], "label": "other.nii.gz"}]}), encoding="utf-8"
    )
    with pytest.raises(SplitsError, match="img0.nii.gz is listed twice with different entries"):
        decathlon_cases(datalist, tmp_path)


def test_msd_datalist_splits_through_the_splits_file_as_before(tmp_path):
    from bundles.msd_tasks import make_task
    from custom.segmentation.msd import msd_datalist

    task = make_task(tmp_path, "Task09_Spleen", cases=7, tests=0)
    splits = tmp_path / "splits_final.json"
    for fold in range(5):
        for section in ("training", "validation"):
            assert msd_datalist(task, section, 5, fold, splits) == msd_datalist(task, section, 5, fold)
    assert splits.is_file()
    with pytest.raises(ValueError, match="fold must be an integer in 0..4"):  # it trained on every case before
        msd_datalist(task, "training", 5, 7)
    assert msd_datalist(task, "validation", 5, None) == msd_datalist(task, "validation", 5, 0)
    labelled = msd_datalist(task, "labelled")
    assert sorted(d["image"] for d in labelled) == sorted(
        d["image"] for d in msd_datalist(task, "training") + msd_datalist(task, "validation")
    )


def test_fold_ckpt_dir_and_bad_folds(tmp_path):
    assert fold_ckpt_dir("/m", 3) == "/m/fold_3" and fold_ckpt_dir("/m", None) == "/m"
    with pytest.raises(SplitsError, match="--fold None"):
        fold_ckpt_dir("/m", "null")
    cases = _cases(tmp_path, 3)
    with pytest.raises(SplitsError, match="fold must be an integer in 0..2"):
        fold_datalist(cases, tmp_path / "s.json", 3, 3)
    with pytest.raises(SplitsError, match="holds out no case"):
        fold_datalist(cases, tmp_path / "s.json", 5, 4)
    with pytest.raises(SplitsError, match="twice"):
        round_robin_splits(["a", "a", "b"], 2)


# ---------------------------------------------------------------- ensemble and TTA


def _net(seed: int, c_out: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, c_out, 3, padding=1)
    ).eval()


def test_ensemble_of_two_models_is_the_mean_of_their_probabilities():
    a, b, x = _net(0), _net(1), torch.randn(2, 2, 8, 6, 4)
    with torch.no_grad():
        mean = (a(x).softmax(1) + b(x).softmax(1)) / 2
        out = EnsemblePredictor([a, b], "softmax")(x)
        assert torch.allclose(out.exp(), mean, atol=1e-6)
        assert torch.allclose(out.softmax(1), mean, atol=1e-6)  # the bundle's Activationsd(softmax) keeps it
        assert torch.equal(out.argmax(1), mean.argmax(1))
        prob = EnsemblePredictor([a, b], "sigmoid", output="probabilities")(x)
        assert torch.allclose(prob, (a(x).sigmoid() + b(x).sigmoid()) / 2, atol=1e-6)
        logit = EnsemblePredictor([a, b], "sigmoid")(x)
        assert torch.allclose(logit.sigmoid(), prob, atol=1e-5)  # Activationsd(sigmoid) + threshold 0.5 stay right


def test_one_model_in_a_sliding_window_gives_the_plain_models_probabilities():
    from monai.inferers import SlidingWindowInferer

    net, x = _net(2), torch.randn(1, 2, 12, 10, 9)
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=2, overlap=0.5, mode="gaussian")
    with torch.no_grad():
        plain = inferer(x, net).softmax(1)
        wrapped = inferer(x, EnsemblePredictor([net], "softmax")).softmax(1)
        assert torch.allclose(plain, wrapped, atol=1e-5)
        z = net(x)
        assert torch.allclose(EnsemblePredictor([net], "sigmoid")(x), z.clamp(-16, 16), atol=1e-3)


def _mirror_symmetric_conv(c_in: int, c_out: int) -> torch.nn.Conv3d:
    conv = torch.nn.Conv3d(c_in, c_out, 3, padding=1)
    with torch.no_grad():
        w = conv.weight
        conv.weight.copy_(sum(torch.flip(w, [a + 2 for a in f]) for f in ALL_FLIPS) / 8)
    return conv


def test_flip_tta_of_a_mirror_symmetric_network_changes_nothing():
    torch.manual_seed(3)
    net = torch.nn.Sequential(_mirror_symmetric_conv(2, 4), torch.nn.Tanh(), _mirror_symmetric_conv(4, 3)).eval()
    x = torch.randn(1, 2, 7, 6, 5)
    with torch.no_grad():
        plain = EnsemblePredictor([net], "softmax")(x)
        tta = EnsemblePredictor([net], "softmax", tta_flips(True))(x)
        assert torch.allclose(plain, tta, atol=1e-5)


def test_flip_tta_of_a_random_network_is_the_mean_of_the_flipped_predictions():
    net, x = _net(4), torch.randn(1, 2, 7, 6, 5)
    flips = [(0,), (1, 2)]
    with torch.no_grad():
        expected = net(x).softmax(1)
        for f in flips:
            dims = [a + 2 for a in f]
            expected = expected + torch.flip(net(torch.flip(x, dims)).softmax(1), dims)
        expected = expected / 3
        out = EnsemblePredictor([net], "softmax", tta_flips([list(f) for f in flips]), output="probabilities")(x)
        assert torch.allclose(out, expected, atol=1e-6)
        assert not torch.allclose(out, net(x).softmax(1), atol=1e-3)  # the network is not symmetric: TTA matters


def test_tta_values_and_their_refusals():
    assert tta_flips(None) == [()] and tta_flips(True) == ALL_FLIPS and len(set(ALL_FLIPS)) == 8
    assert tta_flips([[2, 0], [0, 2], []]) == [(), (0, 2)]
    for bad in ("true", [[3]], [[0, 0]], [0, 1]):
        with pytest.raises(ValueError, match="tta"):
            tta_flips(bad)


def test_load_ensemble_reads_both_weight_layouts_and_names_a_bad_file(tmp_path):
    from custom.networks.weight_files import CheckpointError

    a, b = _net(5), _net(6)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save({"model": b.state_dict(), "recipe": {"x": 1}}, tmp_path / "b.pt")
    ens = load_ensemble(_net(7), [tmp_path / "a.pt", tmp_path / "b.pt"], tta=[[0]])
    x = torch.randn(1, 2, 6, 6, 6)
    with torch.no_grad():
        assert torch.allclose(ens(x), EnsemblePredictor([a, b], "softmax", [(), (0,)])(x), atol=1e-6)
    assert not ens.training
    torch.save(_net(8, c_out=5).state_dict(), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="c.pt"):
        load_ensemble(_net(7), [tmp_path / "a.pt", tmp_path / "c.pt"])
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_ensemble(_net(7), [tmp_path / "missing.pt"])


# ---------------------------------------------------------------- post-processing


def _planted() -> tuple[np.ndarray, np.ndarray]:
    """Label: class 1 one box, class 2 two real boxes, class 3 one box. Prediction: class 1 with a
    false island, class 2 both boxes (the smaller one slightly off), class 3 exact."""
    label = np.zeros((24, 24, 24), np.uint8)
    label[2:10, 2:10, 2:10] = 1
    label[14:22, 2:10, 2:10] = 2
    label[14:18, 14:18, 14:18] = 2
    label[2:8, 14:20, 14:20] = 3
    pred = label.copy()
    pred[20:23, 20:23, 20:23] = 1  # planted island
    pred[14:18, 14:18, 14] = 0  # the second box of class 2 a little thinner: still better kept than removed
    return pred, label


def test_largest_component_removes_a_planted_island_and_is_skipped_where_it_hurts(tmp_path):
    pred, label = _planted()
    decision = decide_largest_component([(pred, label), (label, label)], [1, 2, 3], ["a", "b", "c"])
    c = decision["classes"]
    assert c["1"]["applied"] and c["1"]["dice_after"] == 1.0 and c["1"]["dice_before"] < 1.0
    assert not c["2"]["applied"] and c["2"]["dice_after"] < c["2"]["dice_before"]  # removing a real box hurts
    assert not c["3"]["applied"] and c["3"]["dice_after"] == c["3"]["dice_before"]  # tie: not applied
    assert decision["applied_labels"] == [1] and decision["cases"] == 2
    path = tmp_path / "postprocessing.json"
    write_decision(decision, path)
    out = KeepLargestComponentsd("pred", path)({"pred": torch.as_tensor(pred[None])})["pred"][0].numpy()
    assert (out[20:23, 20:23, 20:23] == 0).all()  # island gone
    assert (out[14:18, 14:18, 15:18] == 2).all() and (out == 3).sum() == (label == 3).sum()  # the rest kept
    assert KeepLargestComponentsd("pred", None)({"pred": pred})["pred"] is pred
    from monai.data import MetaTensor  # after Invertd: a MetaTensor whose grid SaveImaged writes

    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0])).double()
    meta_out = KeepLargestComponentsd("pred", path)({"pred": MetaTensor(torch.as_tensor(pred[None]), affine=affine)})
    assert isinstance(meta_out["pred"], MetaTensor) and torch.allclose(meta_out["pred"].affine, affine)
    assert torch.equal(meta_out["pred"][0], torch.as_tensor(out))
    with pytest.raises(PostprocessingError, match="nothere.json.*run cv_summary"):
        KeepLargestComponentsd("pred", tmp_path / "nothere.json")


# ---------------------------------------------------------------- metrics


def _edges(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (the erosion MONAI uses)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _reference(pred: np.ndarray, label: np.ndarray, spacing, tol: float) -> tuple[float, float]:
    """Brute force: every edge voxel's distance in mm to the other's edge voxels; HD95 and NSD from them."""
    ep, el = (np.argwhere(_edges(m)) * np.asarray(spacing) for m in (pred, label))
    d = np.sqrt(((ep[:, None, :] - el[None, :, :]) ** 2).sum(-1))
    d_pl, d_lp = d.min(1), d.min(0)
    hd95 = max(np.percentile(d_pl, 95), np.percentile(d_lp, 95))
    nsd = ((d_pl <= tol).sum() + (d_lp <= tol).sum()) / (len(d_pl) + len(d_lp))
    return float(hd95), float(nsd)


def test_hd95_and_nsd_of_two_points_in_millimetres():
    label, pred = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    label[3, 3, 3], pred[4, 3, 5] = 1, 1  # offset (1, 0, 2) voxels of (0.8, 0.8, 2.5) mm
    expected = math.sqrt(0.8**2 + 5.0**2)
    m = case_metrics(pred, label, [1], (0.8, 0.8, 2.5), [expected - 0.01])
    assert m["dice"] == [0.0] and m["hd95"][0] == pytest.approx(expected, abs=1e-4) and m["nsd"] == [0.0]
    assert case_metrics(pred, label, [1], (0.8, 0.8, 2.5), expected + 0.01)["nsd"] == [1.0]


def test_hd95_and_nsd_of_boxes_with_anisotropic_spacing_match_brute_force():
    label, pred = np.zeros((20, 20, 12), np.uint8), np.zeros((20, 20, 12), np.uint8)
    label[4:12, 5:13, 3:7] = 1
    pred[5:14, 5:12, 4:9] = 1
    spacing, tol = (0.7, 0.9, 3.0), 2.0
    m = case_metrics(pred, label, [1], spacing, tol)
    hd95, nsd = _reference(pred.astype(bool), label.astype(bool), spacing, tol)
    assert m["hd95"][0] == pytest.approx(hd95, rel=1e-4) and m["nsd"][0] == pytest.approx(nsd, rel=1e-4)
    inter = ((pred == 1) & (label == 1)).sum()
    assert m["dice"][0] == pytest.approx(2 * inter / ((pred == 1).sum() + (label == 1).sum()))
    assert case_metrics(pred, label, [1], (1.0, 1.0, 1.0), tol)["hd95"][0] != pytest.approx(hd95, rel=1e-2)


def test_concentric_spheres_in_mm():
    spacing = np.array([1.0, 1.0, 2.5])
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip((40, 40, 16), spacing, strict=True)], indexing="ij"))
    r = np.sqrt(((grid - np.array([20.0, 20.0, 20.0])[:, None, None, None]) ** 2).sum(0))
    label, pred = (r <= 10.0).astype(np.uint8), (r <= 13.0).astype(np.uint8)
    m = case_metrics(pred, label, [1], spacing, [1.0])
    assert m["hd95"][0] == pytest.approx(3.0, abs=1.0)  # the radii differ by 3 mm
    assert m["dice"][0] == pytest.approx(2 * label.sum() / (label.sum() + pred.sum()))
    assert case_metrics(pred, label, [1], spacing, [6.0])["nsd"] == [1.0] and m["nsd"] == [0.0]
    hd95, nsd = _reference(pred.astype(bool), label.astype(bool), spacing, 3.0)
    m3 = case_metrics(pred, label, [1], spacing, [3.0])
    assert m3["hd95"][0] == pytest.approx(hd95, rel=1e-4) and m3["nsd"][0] == pytest.approx(nsd, rel=1e-4)
    assert 0.0 < nsd < 1.0


def test_empty_classes_follow_the_stated_rule():
    label, pred = np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 4), np.uint8)
    label[2:4, 2:4, 1:3] = 1
    pred[2:4, 2:4, 1:3] = 2  # class 1 missed, class 2 false positive, class 3 nowhere
    diagonal = math.sqrt(10**2 + (10 * 0.5) ** 2 + (4 * 3.0) ** 2)
    m = case_metrics(pred, label, [1, 2, 3], (1.0, 0.5, 3.0), 1.0)
    assert m["dice"] == [0.0, 0.0, None] and m["nsd"] == [0.0, 0.0, None]
    assert m["hd95"] == [pytest.approx(diagonal), pytest.approx(diagonal), None]
    assert case_metrics(pred, label, [1, 2, 3], (1.0, 0.5, 3.0), 1.0, hd95_empty=None)["hd95"] == [None, None, None]


def test_summary_mean_and_std_per_fold_and_pooled():
    cases = [
        {"fold": 0, "case": "a", "dice": [1.0, 0.5], "hd95": [0.0, 2.0], "nsd": [1.0, None]},
        {"fold": 0, "case": "b", "dice": [0.5, None], "hd95": [2.0, None], "nsd": [0.5, None]},
        {"fold": 1, "case": "c", "dice": [0.0, 1.0], "hd95": [4.0, 0.0], "nsd": [0.0, 1.0]},
    ]
    s = summarize(cases, ["liver", "spleen"], 2.0)
    assert s["folds"]["0"]["dice"]["liver"] == {"mean": 0.75, "std": 0.25, "n": 2}
    assert s["folds"]["0"]["dice"]["spleen"] == {"mean": 0.5, "std": 0.0, "n": 1}
    assert s["pooled"]["dice"]["liver"]["mean"] == pytest.approx(0.5) and s["pooled"]["cases"] == 3
    pooled_mean = s["pooled"]["dice"]["mean"]  # mean of class means (0.5, 0.75); std over case means (.75,.5,.5)
    assert pooled_mean["mean"] == pytest.approx(0.625) and pooled_mean["std"] == pytest.approx(np.std([0.75, 0.5, 0.5]))
    assert s["folds"]["0"]["nsd"]["spleen"] == {"mean": None, "std": None, "n": 0}
    md = summary_markdown(s)
    assert "## Pooled (3 cases)" in md and "## Fold 1 (1 cases)" in md and "| liver | 0.500 ± 0.408 |" in md
    assert "| spleen | 0.500 ± 0.000 | 2.00 ± 0.00 | – |" in md and "2 mm" in md


# ---------------------------------------------------------------- cv_summary


def _write(path: Path, data: np.ndarray, spacing=(0.8, 0.8, 2.5)) -> str:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))
    return str(path)


def test_cv_summary_writes_the_tables_and_the_decision(tmp_path):
    pred, label = _planted()
    folds = {}
    for fold in range(2):
        pairs = []
        for i in range(2):
            case = f"f{fold}c{i}"
            lab = _write(tmp_path / f"{case}_label.nii.gz", label)
            prd = _write(tmp_path / f"{case}_seg.nii.gz", pred if i == 0 else label)
            pairs.append((lab, prd))
        folds[fold] = pairs
    out = tmp_path / "eval"
    s = cv_summary(folds, out, ["a", "b", "c"], [2.0, 2.0, 1.0])
    saved = json.loads((out / "cv_summary.json").read_text(encoding="utf-8"))
    assert saved["pooled"]["cases"] == 4 and set(saved["folds"]) == {"0", "1"} and len(saved["cases"]) == 4
    assert saved["pooled"]["dice"]["c"] == {"mean": 1.0, "std": 0.0, "n": 4}
    assert saved["pooled"]["hd95"]["c"]["mean"] == 0.0 and saved["nsd_tolerance_mm"] == [2.0, 2.0, 1.0]
    assert saved["pooled"]["dice"]["a"]["mean"] < 1.0 and s["postprocessing"]["applied_labels"] == [1]
    decision = json.loads((out / "postprocessing.json").read_text(encoding="utf-8"))
    assert decision["applied_labels"] == [1] and decision["cases"] == 4
    md = (out / "cv_summary.md").read_text(encoding="utf-8")
    assert "| a |" in md and "## Fold 0 (2 cases)" in md and "largest connected component kept for a (" in md
    # a prediction not on its label's grid is refused, naming both files
    bad = _write(tmp_path / "bad_seg.nii.gz", label, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="bad_seg.nii.gz: not on the grid of its label .*f0c0_label"):
        cv_summary({0: [(folds[0][0][0], bad)]}, out, ["a", "b", "c"], 2.0)


def test_a_missing_package_is_named_with_the_fix():
    from custom.segmentation.metrics import require

    with pytest.raises(ImportError, match="needs no-such-package, which is not installed: pip install -r requirements"):
        require("no_such_module_for_this_test", "no-such-package", "this step")


def test_the_predictor_of_a_config_is_the_plain_network_by_default(tmp_path):
    net = _net(9)
    assert ensemble_predictor(net) is net and ensemble_predictor(net, None, None) is net
    wrapped = ensemble_predictor(net, None, [[0]])
    trained = _net(10)
    net.load_state_dict(trained.state_dict())  # ModelLoader fills the network after the predictor is built
    x = torch.randn(1, 2, 6, 6, 6)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), EnsemblePredictor([trained], "softmax", [(), (0,)])(x), atol=1e-6)
    files = fold_weight_files(tmp_path, 2)
    assert files == [str(tmp_path / "fold_0" / "model.pt"), str(tmp_path / "fold_1" / "model.pt")]
    for f, seed in zip(files, (11, 12), strict=True):
        Path(f).parent.mkdir()
        torch.save(_net(seed).state_dict(), f)
    ens = ensemble_predictor(net, files, True, "sigmoid")
    assert isinstance(ens, EnsemblePredictor) and len(ens.networks) == 2 and len(ens.flips) == 8
    with pytest.raises(ValueError, match="ensemble must be a list of weight files"):
        ensemble_predictor(net, "null")
    onnx_like = torch.nn.Identity()  # stands for the ONNX Runtime predictor of @predictor
    assert ensemble_predictor(net, None, False, predictor=onnx_like) is onnx_like
    assert ensemble_predictor(net, None, True, predictor=onnx_like).networks[0] is onnx_like
    assert ensemble_predictor(net, files, False, predictor=onnx_like).networks[0] is not onnx_like


def test_cv_summary_from_splits_finds_each_folds_predictions_by_case_name(tmp_path):
    from custom.segmentation.cv_summary import cv_summary_from_splits

    pred, label = _planted()
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    cases = []
    for i in range(4):
        image = _write(tmp_path / "imagesTr" / f"img{i:04d}.nii.gz", label)  # the image's content is not read
        cases.append({"image": image, "label": _write(tmp_path / "labelsTr" / f"label{i:04d}.nii.gz", label)})
    splits = tmp_path / "models" / "splits_final.json"
    for fold in range(2):
        out = tmp_path / "eval" / f"fold_{fold}"
        out.mkdir(parents=True)
        for item in fold_datalist(cases, splits, 2, fold, "validation", tmp_path):
            _write(out / f"{Path(item['image']).name.split('.')[0]}_seg.nii.gz", pred)
    s = cv_summary_from_splits(
        cases, splits, 2, str(tmp_path / "eval" / "fold_{fold}"), tmp_path / "eval", ["a", "b", "c"], 2.0, tmp_path
    )
    assert s["pooled"]["cases"] == 4 and {c["fold"] for c in s["cases"]} == {0, 1}
    held_out_0 = {c["case"] for c in s["cases"] if c["fold"] == 0}
    assert held_out_0 == {cases[0]["label"], cases[2]["label"]}  # round robin: cases 0 and 2 in fold 0
    assert (tmp_path / "eval" / "postprocessing.json").is_file()
    (tmp_path / "eval" / "fold_1" / "img0003_seg.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="img0003_seg.nii.gz: the prediction of fold 1.*--fold 1"):
        cv_summary_from_splits(cases, splits, 2, str(tmp_path / "eval" / "fold_{fold}"), tmp_path, ["a"], 2.0, tmp_path)
