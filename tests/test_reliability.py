"""Reliability: atomic checkpoints, kill -9 and resume, non-finite loss, pickle payloads, checksums, preflight."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BTCV, REPO, SMALL, btcv_overrides, bundle_command, run_bundle, sha256
from ignite.engine import Engine

from custom.engines.monitoring import NonFiniteLossError, StopOnNonFiniteLoss
from custom.engines.training_checkpoint import TrainingCheckpoint
from custom.networks.weights import load_swinvit_weights, verified_path
from custom.utils import atomic_torch_save, atomic_write


def test_a_failed_save_leaves_the_previous_checkpoint_readable(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"iteration": 1}, path)

    def torn_write(f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("killed mid-write")

    with pytest.raises(OSError):
        atomic_write(path, torn_write)
    assert torch.load(path, weights_only=True) == {"iteration": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_every_torch_load_in_custom_is_weights_only():
    calls = [
        (p.name, line.strip())
        for p in (REPO / "custom").rglob("*.py")
        for line in p.read_text(encoding="utf-8").splitlines()
        if "torch.load(" in line and not line.strip().startswith(("#", ">>>"))
    ]
    assert calls and all("weights_only=True" in line for _, line in calls), calls


class Payload:
    """Unpickling this runs Path.touch(marker): code execution, if the loader allowed it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payload_in_a_weight_file_is_refused_not_run(tmp_path):
    from monai.networks.nets import SwinUNETR

    marker = tmp_path / "pwned"
    evil = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": {"module.patch_embed.proj.weight": Payload(marker)}}, evil)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_swinvit_weights(SwinUNETR(in_channels=1, out_channels=14, feature_size=12), evil)
    assert not marker.exists()


def test_pickle_payload_in_checkpoint_is_refused_on_resume(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(marker)}, tmp_path / "checkpoint.pt")
    engine = Engine(lambda e, b: None)
    handler = TrainingCheckpoint(str(tmp_path), {"model": torch.nn.Linear(1, 1)})
    handler.attach(engine)
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.run([0], max_epochs=1)
    assert not marker.exists()


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(engine, batch):
        return {"loss": torch.tensor(float("nan") if engine.state.iteration == 3 else 1.0)}

    engine = Engine(step)
    TrainingCheckpoint(str(tmp_path), {"model": model, "optimizer": optimizer}).attach(engine)
    StopOnNonFiniteLoss(str(tmp_path)).attach(engine)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, iteration 3.*last completed epoch"):
        engine.run([0, 1], max_epochs=5)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 2  # epoch 1's


def test_checksum_in_large_files_yml_is_enforced(tmp_path):
    weights = tmp_path / "models" / "model.pt"
    weights.parent.mkdir()
    torch.save({"w": torch.ones(2)}, weights)
    assert verified_path(str(weights), str(tmp_path)) == str(weights)  # not listed: nothing to check
    import hashlib

    good = hashlib.sha256(weights.read_bytes()).hexdigest()
    (tmp_path / "large_files.yml").write_text(
        f'large_files:\n  - path: "models/model.pt"\n    url: "file:///nowhere"\n    hash_val: {good!r}\n    hash_type: "sha256"\n',
        encoding="utf-8",
    )
    assert verified_path(str(weights), str(tmp_path)) == str(weights)
    (tmp_path / "large_files.yml").write_text(
        (tmp_path / "large_files.yml").read_text(encoding="utf-8").replace(good, "0" * 64), encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"model.pt: sha256 .* does not match large_files.yml"):
        verified_path(str(weights), str(tmp_path))


def test_kill_9_during_training_then_the_same_command_resumes(tmp_path, sample_dataset):
    overrides = btcv_overrides(
        sample_dataset, tmp_path, max_epochs=4, epoch_length=1, val_interval=100, warmup_epochs=2
    )
    cmd = bundle_command("training", ["configs/train.json"], overrides)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ckpt = tmp_path / "models" / "checkpoint.pt"
    proc = subprocess.Popen(cmd, cwd=BTCV, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.exists():
                try:
                    if torch.load(ckpt, weights_only=True)["trainer"]["iteration"] >= 1:
                        break
                except Exception:  # being replaced right now: atomic rename, try again
                    pass
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = torch.load(ckpt, weights_only=True)["trainer"]["iteration"]
    assert 1 <= saved < 4

    again = run_bundle("training", ["configs/train.json"], overrides)
    assert f"resumed from {ckpt}: epoch {saved}, iteration {saved}" in again.stdout
    epochs_run = sorted({int(m) for m in re.findall(r"Epoch: (\d+)/4", again.stdout)})
    assert epochs_run == list(range(saved + 1, 5))  # only the epochs left, not a restart
    state = torch.load(ckpt, weights_only=True)
    assert state["trainer"]["iteration"] == 4
    # warm-up 2 steps then cosine over 4: the LR after 4 steps is the schedule's, continued across the kill
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    from monai.optimizers import WarmupCosineSchedule

    sched = WarmupCosineSchedule(opt, warmup_steps=2, t_total=4)
    for _ in range(4):
        opt.step()
        sched.step()
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)


def _write(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0])), str(path))


def test_inference_checks_its_inputs_first_and_the_flag_skips_it(tmp_path, trained):
    inp = tmp_path / "in"
    bad = np.zeros((40, 40, 30), np.float32)
    bad[5, 5, 5] = np.nan
    _write(inp / "broken.nii.gz", bad)
    (inp / "truncated.nii.gz").write_bytes((inp / "broken.nii.gz").read_bytes()[:200])
    out = tmp_path / "seg"
    args = {**SMALL, "ckpt_dir": trained["ckpt_dir"], "input_dir": str(inp), "output_dir": str(out)}
    proc = run_bundle("inference", ["configs/inference.json"], args, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "found 2 problem(s)" in text
    assert "broken.nii.gz: image holds NaN or Inf values" in text and "truncated.nii.gz: unreadable image" in text
    assert not out.exists()

    (inp / "truncated.nii.gz").unlink()
    run_bundle("inference", ["configs/inference.json"], {**args, "preflight": False})  # the check is skipped
    assert (out / "broken_seg.nii.gz").is_file()


def test_msd_task_folder_problems_are_named_before_training(tmp_path):
    from bundles.msd_tasks import make_task

    task = make_task(tmp_path, "Task09_Spleen", cases=2, tests=0)
    meta = json.loads((task / "dataset.json").read_text(encoding="utf-8"))
    meta["name"] = "Kidney"
    del meta["modality"]
    (task / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    renamed = task.rename(tmp_path / "Task11_Kidney")
    proc = run_bundle(
        "check_data", ["configs/train.json"], {"dataset_dir": str(renamed)}, cwd=REPO / "swin_unetr_msd", check=False
    )
    assert proc.returncode != 0 and "Task11_Kidney/dataset.json: missing ['modality']" in proc.stdout + proc.stderr


# --- training stops at a case it cannot load, and checkpoint/resume errors name the file (issue 13, 1/4/5) ---


def _dataset_with_bad_case(root: Path, sample_dataset: Path, name: str, data: bytes) -> Path:
    """The sample's labelled case, then ``imagesTr/<name>`` holding ``data``, as the training section."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for rel in ("imagesTr/img0001.nii.gz", "labelsTr/label0001.nii.gz"):
        os.symlink((sample_dataset / rel).resolve(), root / rel)
    (root / "imagesTr" / name).write_bytes(data)
    good = {"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}
    bad = {"image": f"imagesTr/{name}", "label": "labelsTr/label0001.nii.gz"}
    (root / "dataset_0.json").write_text(json.dumps({"training": [good, bad], "validation": [good]}), encoding="utf-8")
    return root


def _one_step_epochs(tmp_path: Path, dataset_dir: Path, **extra) -> dict:
    settings = {"max_epochs": 2, "epoch_length": 1, "val_interval": 100, "warmup_epochs": 0, **extra}
    return btcv_overrides(dataset_dir, tmp_path, **settings)


def test_checked_thread_loader_raises_what_its_thread_met(tmp_path):
    from monai.transforms import Compose, Lambdad

    from custom.data.train_data import CaseLoadError, CheckedCacheDataset, CheckedThreadDataLoader

    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"")

    def load(path):
        if path == str(bad):
            raise EOFError("Compressed file ended")
        return 1.0

    items = [{"image": str(tmp_path)}, {"image": str(bad)}]
    data = CheckedCacheDataset(items, Compose([Lambdad("image", load)]), section="training", cache_rate=0.0)
    seen = []
    with pytest.raises(CaseLoadError, match=r"image .*bad.nii.gz: failed in Lambdad \(EOFError: Compressed file"):
        for batch in CheckedThreadDataLoader(data, batch_size=1):
            seen.append(batch)
    assert len(seen) == 1  # the batch made before the failure, then the error, not a quiet end


@pytest.fixture(scope="module")
def stopped_at_bad_case(tmp_path_factory, sample_dataset) -> dict:
    """Train on [good, truncated .nii.gz] in that order, one case per epoch, uncached, without preflight."""
    tmp = tmp_path_factory.mktemp("bad_case_run")
    good = (sample_dataset / "imagesTr" / "img0001.nii.gz").read_bytes()
    data = _dataset_with_bad_case(tmp / "data", sample_dataset, "img0002.nii.gz", good[: len(good) // 2])
    overrides = _one_step_epochs(tmp, data, preflight=False, cache_rate=0.0, **{"train#dataloader#shuffle": False})
    proc = run_bundle("training", ["configs/train.json"], overrides, check=False)
    return {"proc": proc, "ckpt": tmp / "models" / "checkpoint.pt", "bad": data / "imagesTr" / "img0002.nii.gz"}


def test_training_stops_at_a_truncated_case_naming_it_and_keeps_the_checkpoint(stopped_at_bad_case):
    # before: the data loader's thread died with the error, ignite restarted the loader, exit 0, the case never seen
    proc, ckpt = stopped_at_bad_case["proc"], stopped_at_bad_case["ckpt"]
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert f"{stopped_at_bad_case['bad']}: cannot be read (EOFError" in text and "training case 2 of 2" in text
    assert "training stopped at epoch 2, iteration 1 by a CaseLoadError" in text
    assert f"{ckpt} still holds epoch 1" in text
    assert "Epoch[2] Complete" not in text
    assert torch.load(ckpt, weights_only=True)["trainer"]["iteration"] == 1  # epoch 1's, not replaced


def test_training_names_a_truncated_mha_while_caching(tmp_path, sample_dataset):
    header = b"ObjectType = Image\nNDims = 3\nDimSize = 40 40 30\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    data = _dataset_with_bad_case(tmp_path / "data", sample_dataset, "img0002.mha", header + bytes(4 * 40 * 40 * 15))
    # preflight reads .mha too and would stop it first (tests/test_preflight.py); here the cache must name it
    overrides = {**_one_step_epochs(tmp_path, data), "preflight": False}
    proc = run_bundle("training", ["configs/train.json"], overrides, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"ERROR - {data / 'imagesTr' / 'img0002.mha'}: cannot be read (RuntimeError" in text
    assert "training case 2 of 2" in text and not (tmp_path / "models" / "checkpoint.pt").exists()


def test_a_model_pt_without_checkpoint_is_kept_beside_the_new_one(tmp_path, sample_dataset):
    # before: training from scratch replaced it at its first validation, no copy kept
    models = tmp_path / "models"
    models.mkdir()
    torch.save({"out.conv.conv.weight": torch.ones(14, 12, 1, 1, 1)}, models / "model.pt")  # the user's weights
    before = sha256(models / "model.pt")
    proc = run_bundle("training", ["configs/train.json"], _one_step_epochs(tmp_path, sample_dataset, val_interval=1))
    backups = list(models.glob("model.pt.*.bak"))
    assert len(backups) == 1 and sha256(backups[0]) == before
    assert f"{models / 'model.pt'} was not written by this run (no checkpoint.pt beside it): kept a copy as" in (
        proc.stdout + proc.stderr
    )
    assert sha256(models / "model.pt") != before  # this run's best replaced it, the user's is beside it


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_checkpoint_is_named_with_its_fix(tmp_path, sample_dataset, stopped_at_bad_case, damage):
    models = tmp_path / "models"
    models.mkdir()
    good = stopped_at_bad_case["ckpt"].read_bytes()
    (models / "checkpoint.pt").write_bytes(b"" if damage == "empty" else good[: len(good) // 2])
    before = sha256(models / "checkpoint.pt")
    proc = run_bundle("training", ["configs/train.json"], _one_step_epochs(tmp_path, sample_dataset), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    said = "is empty (0 bytes)" if damage == "empty" else f"is truncated or damaged ({len(good) // 2} bytes"
    assert f"{models / 'checkpoint.pt'} {said}" in text and "--resume False" in text
    assert sorted(os.listdir(models)) == ["checkpoint.pt"] and sha256(models / "checkpoint.pt") == before


def test_resume_with_another_feature_size_says_the_one_it_was_trained_with(
    tmp_path, sample_dataset, stopped_at_bad_case
):
    models = tmp_path / "models"
    models.mkdir()
    (models / "checkpoint.pt").write_bytes(stopped_at_bad_case["ckpt"].read_bytes())  # feature_size 12, epoch 1
    before = sha256(models / "checkpoint.pt")
    args = _one_step_epochs(tmp_path, sample_dataset, feature_size=24)
    proc = run_bundle("training", ["configs/train.json"], args, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{models / 'checkpoint.pt'} was trained with feature_size=12" in text and "--feature_size 12" in text
    assert "size mismatch" not in text  # not PyTorch's dump of every tensor
    assert sha256(models / "checkpoint.pt") == before


def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno

    from custom.utils import DiskFullError

    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"iteration": 1}, path)

    def no_space(f):
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"the disk at {tmp_path} is full .*the previous {path} is intact"):
        atomic_write(path, lambda f: torch.save({"w": torch.ones(3)}, f) or no_space(f))
    assert torch.load(path, weights_only=True) == {"iteration": 1} and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_training_on_a_full_disk_stops_naming_it_with_the_last_checkpoint_intact(
    tmp_path, sample_dataset, stopped_at_bad_case
):
    """ckpt_dir on a tmpfs with room for one checkpoint and a half: the second save runs out of space."""
    models = tmp_path / "models"
    models.mkdir()
    size = stopped_at_bad_case["ckpt"].stat().st_size
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(models)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the unit test above covers the message")
    try:
        proc = run_bundle("training", ["configs/train.json"], _one_step_epochs(tmp_path, sample_dataset), check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0
        ckpt = models / "checkpoint.pt"
        assert f"the disk at {models} is full" in text and f"the previous {ckpt} is intact" in text
        assert f"{ckpt} still holds epoch 1" in text
        assert torch.load(ckpt, weights_only=True)["trainer"]["iteration"] == 1
        assert os.listdir(models) == ["checkpoint.pt"]  # no temporary file left taking the space
    finally:
        subprocess.run(["umount", str(models)])
