"""Issue 17, items 5, 8 and 10: one run per ckpt_dir, two "nodes" under a c10d rendezvous, memory planned before caching.

Real subprocesses at the tests' small sizes (helpers SMALL): a second training run on a busy
``ckpt_dir`` is refused naming the first, ``kill -9`` leaves nothing stuck, the multi-GPU configs run
as 2 nodes x 1 process (two torchrun launchers on localhost, gloo), and the cache planner's estimate
matches the real cache and falls back when its budget is too small.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import BTCV, REPO, SSL, btcv_overrides, bundle_command, run_bundle, ssl_overrides

MULTI = ["configs/train.json", "configs/multi_gpu_train.json"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _start(run_id: str, configs: list[str], overrides: dict, cwd: Path, python_args: tuple = (), log: Path = None):
    cmd = bundle_command(run_id, configs, overrides)
    cmd[1:1] = python_args
    out = open(log, "w", encoding="utf-8") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _lock_holder(ckpt_dir: Path) -> dict:
    try:
        return json.loads((ckpt_dir / ".lock").read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- item 5: one run per ckpt_dir


def test_second_run_on_a_busy_ckpt_dir_is_refused_and_a_killed_run_leaves_no_stuck_lock(
    sample_dataset, tmp_path, monkeypatch
):
    models = tmp_path / "models"
    first_args = btcv_overrides(
        sample_dataset,
        tmp_path,
        warmup_epochs=0,
        val_interval=100,
        max_epochs=4,
        epoch_length=2,
        output_dir=str(tmp_path / "out1"),
    )
    first = _start("training", ["configs/train.json"], first_args, BTCV, log=tmp_path / "first.log")
    try:
        _wait_for(lambda: _lock_holder(models).get("pid") == first.pid, 120, "the first run to take the lock")
        second = run_bundle(
            "training",
            ["configs/train.json"],
            {**first_args, "output_dir": str(tmp_path / "out2")},
            check=False,
            timeout=300,
        )
        assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
        assert second.returncode != 0
        err = second.stdout + second.stderr
        assert "another training run is using this checkpoint folder" in err
        assert f"PID {first.pid}" in err and f"host {socket.gethostname()}" in err
        assert first.wait(timeout=400) == 0, (tmp_path / "first.log").read_text(encoding="utf-8", errors="replace")[
            -3000:
        ]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert torch.load(models / "checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 8  # the first run's own
    assert not (models / ".lock").exists()  # a run that ends removes its lock file

    # kill -9 while it holds the lock: the kernel releases it, the next run starts (from the stale file too)
    killed = _start("training", ["configs/train.json"], {**first_args, "ckpt_dir": str(tmp_path / "k")}, BTCV)
    _wait_for(lambda: _lock_holder(tmp_path / "k").get("pid") == killed.pid, 120, "the run to take the lock")
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert (tmp_path / "k" / ".lock").exists()  # left behind, as a kill leaves it
    again = {**first_args, "ckpt_dir": str(tmp_path / "k"), "max_epochs": 1, "epoch_length": 1, "resume": False}
    # the same run also shows item 10's fallback: a 1 MiB host budget for a ~5 MiB cache -> nothing cached
    monkeypatch.setenv("SWIN_CACHE_HOST_MIB", "1")
    proc = run_bundle("training", ["configs/train.json"], again, timeout=400)
    assert re.search(
        r"training cache: 1 of 1 cases, about \d+ MiB estimated; does not fit in host RAM \(1 MiB", proc.stdout
    )
    assert "caching 0 of 1 cases (cache_rate 1 -> 0" in proc.stdout
    assert torch.load(tmp_path / "k" / "checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 1


def _acquire_in_a_child(ckpt_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """``RunLock(ckpt_dir).acquire()`` in another Python process, with ``env`` added to its environment."""
    code = f"from custom.engines.run_lock import RunLock; RunLock({str(ckpt_dir)!r}).acquire()"
    return subprocess.run(  # in the repository root: its ``custom`` on the path, as ``python -c`` puts the cwd first
        [sys.executable, "-c", code], capture_output=True, text=True, env={**_env(), **env}, cwd=REPO
    )


def test_lock_is_per_process_and_skipped_by_other_ranks(tmp_path, monkeypatch):
    from custom.engines.run_lock import RunLock

    lock = RunLock(tmp_path).acquire()
    child = _acquire_in_a_child(tmp_path)
    assert child.returncode != 0 and f"PID {os.getpid()}" in child.stderr
    monkeypatch.setenv("RANK", "1")  # another rank of the same run: no lock taken, no refusal
    child = _acquire_in_a_child(tmp_path, RANK="1")
    assert child.returncode == 0, child.stderr
    lock.release()
    assert not (tmp_path / ".lock").exists()


# ---------------------------------------------------------------- item 8: many nodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(configs: list[str], overrides: dict, cwd: Path, tmp_path: Path, timeout: int = 300) -> list[str]:
    """Two torchrun launchers on localhost, 1 process each, one c10d rendezvous; returns both logs."""
    port, run_id = _free_port(), uuid.uuid4().hex[:8]
    launchers = []
    for node in (0, 1):
        args = (
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            run_id,
        )
        launchers.append(
            _start("training", configs, overrides, cwd, python_args=args, log=tmp_path / f"node{node}.log")
        )
    try:
        codes = [p.wait(timeout=timeout) for p in launchers]
    finally:
        for p in launchers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = [(tmp_path / f"node{n}.log").read_text(encoding="utf-8", errors="replace") for n in (0, 1)]
    assert codes == [0, 0], "\n\n".join(log[-4000:] for log in logs)
    return logs


def test_btcv_trains_on_two_nodes_with_a_c10d_rendezvous(two_case_dataset, tmp_path):
    overrides = btcv_overrides(two_case_dataset, tmp_path, warmup_epochs=0, max_epochs=1, val_interval=1)
    _two_nodes(MULTI, overrides, BTCV, tmp_path)
    state = torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 1  # 2 cases over 2 nodes: one step each
    assert (tmp_path / "models" / "model.pt").is_file() and not (tmp_path / "models" / ".lock").exists()


def test_ssl_pretrains_on_two_nodes_with_a_c10d_rendezvous(sample_dataset, tmp_path):
    overrides = ssl_overrides(sample_dataset, tmp_path, max_epochs=1, epoch_length=1)
    logs = _two_nodes(MULTI, overrides, SSL, tmp_path)
    out = "\n".join(logs)
    assert "rank 0: random seed 0 (base seed 0 + rank)" in out and "rank 1: random seed 1 (base seed 0 + rank)" in out
    state = torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 1
    assert (tmp_path / "models" / "model_swinvit.pt").is_file()


# ---------------------------------------------------------------- item 10: memory planned before caching


def test_cache_estimate_matches_the_real_cache_of_the_sample_ct_and_falls_back(sample_dataset, tmp_path, monkeypatch):
    """Recipe spacing (1.5 x 1.5 x 2.0 mm): calibrated on the labelled slab, the estimate for the full CT is within 10 %."""
    import nibabel as nib
    import numpy as np
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from custom.data.cache_plan import CachePlan

    full = nib.load(sample_dataset / "imagesTs" / "ct_full.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(full.shape, np.uint8), full.affine), tmp_path / "label_full.nii.gz")
    data = [
        {
            "image": str(sample_dataset / "imagesTr/img0001.nii.gz"),
            "label": str(sample_dataset / "labelsTr/label0001.nii.gz"),
        },
        {"image": str(sample_dataset / "imagesTs/ct_full.nii.gz"), "label": str(tmp_path / "label_full.nii.gz")},
    ]
    parser = ConfigParser()
    parser.read_config(str(BTCV / "configs" / "train.json"))
    parser["data_device"] = "cpu"
    parser["train#cache_plan#data"] = data
    plan = parser.get_parsed_content("train#cache_plan")
    cached = Compose(
        parser.get_parsed_content("train#deterministic_transforms") + parser.get_parsed_content("train#cache_tail")
    )
    for item, estimate in zip(data, plan.per_case, strict=True):
        out = cached(dict(item))
        real = sum(v.numel() * v.element_size() for v in out.values() if torch.is_tensor(v))
        assert real <= estimate <= 1.1 * real, (item["image"], estimate / 2**20, real / 2**20)
    assert plan.device == torch.device("cpu") and plan.cache_rate == 1.0

    # a device cache that does not fit moves to the CPU; a host budget for one case caches one of two
    monkeypatch.setenv("SWIN_CACHE_DEVICE_MIB", "1")
    monkeypatch.setenv("SWIN_CACHE_HOST_MIB", str(plan.per_case[0] / 2**20 + 1))
    kwargs = dict(
        data=data,
        transform=parser.get_parsed_content("train#deterministic_transforms"),
        pixdim=[1.5, 1.5, 2.0],
        roi_size=[96, 96, 96],
        cached_bytes={"image": 4, "label": 1},
        index_bytes=4,
    )
    small = CachePlan(device="cuda:0", **kwargs)
    assert small.device == torch.device("cpu") and int(len(data) * small.cache_rate) == 1
    with pytest.raises(ValueError, match="cache_rate must be within"):
        CachePlan(cache_rate=1.5, **kwargs)
