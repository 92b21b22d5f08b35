"""Long runs (issue 17): stop on SIGTERM/SIGUSR1 with a checkpoint, checkpoint_interval, two generations,
resume with a changed recipe. In-process tests on a toy engine, then real bundle subprocesses sent real signals."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BTCV, SMALL, bundle_command, run_bundle
from ignite.engine import Engine, Events
from monai.optimizers import WarmupCosineSchedule

from custom.handlers import PREEMPTED_EXIT_CODE, CheckpointError, TrainingCheckpoint, TrainingPreempted
from custom.utils import atomic_torch_save, remove_stale_temporaries


def _toy(tmp_path: Path, lr: float = 1e-3, t_total: int = 8, kill_at: int | None = None, **kwargs):
    """A trainer of one Linear layer with AdamW + warm-up cosine, checkpointed by TrainingCheckpoint."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=2, t_total=t_total)

    def step(engine, batch):
        optimizer.zero_grad()
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if engine.state.iteration == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-iteration: the iteration still completes
        return {"loss": loss.detach()}

    engine = Engine(step)
    ckpt = TrainingCheckpoint(
        str(tmp_path), {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler}, **kwargs
    )
    ckpt.attach(engine)
    return engine, optimizer, scheduler


def _lr_after(steps: int, lr: float, t_total: int) -> float:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = WarmupCosineSchedule(opt, warmup_steps=2, t_total=t_total)
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def test_sigterm_in_process_finishes_the_iteration_saves_and_exits_with_the_preempted_status(tmp_path):
    engine, _, _ = _toy(tmp_path, kill_at=3)
    with pytest.raises(TrainingPreempted, match=r"SIGTERM \(received during iteration 3\): stopped after iteration 3") as e:
        engine.run([0, 1, 2, 3], max_epochs=2)
    assert e.value.code == PREEMPTED_EXIT_CODE == 75
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 3  # mid-epoch 1 of 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler given back
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]

    engine, optimizer, scheduler = _toy(tmp_path)  # the same command: resumes at iteration 3, in epoch 1
    seen = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append((e.state.epoch, e.state.iteration)))
    engine.run([0, 1, 2, 3], max_epochs=2)
    assert seen == [(1, 4), (2, 5), (2, 6), (2, 7), (2, 8)]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(_lr_after(8, 1e-3, 8), abs=1e-12)


def test_checkpoint_interval_saves_every_n_iterations_and_keeps_the_previous_generation(tmp_path):
    engine, _, _ = _toy(tmp_path, checkpoint_interval=3)
    its = []
    engine.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: its.append(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["trainer"]["iteration"])
        if (tmp_path / "checkpoint.pt").exists()
        else its.append(None),
    )
    engine.run(list(range(5)), max_epochs=1)
    assert its == [None, None, 3, 3, 3]  # saved at iteration 3 (then at the epoch's end, 5)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 5
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["trainer"]["iteration"] == 3
    with pytest.raises(ValueError, match="checkpoint_interval must be None"):
        TrainingCheckpoint(str(tmp_path), {}, checkpoint_interval=0)


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one_naming_it(tmp_path, caplog):
    engine, _, _ = _toy(tmp_path, checkpoint_interval=2)
    engine.run(list(range(4)), max_epochs=1)  # saves at 2 and 4: prev = 2, newest = 4
    newest = tmp_path / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    engine, _, _ = _toy(tmp_path)
    with caplog.at_level("WARNING"):
        engine.run(list(range(4)), max_epochs=2)
    text = caplog.text
    assert f"{newest} is truncated or damaged" in text and f"Resuming from the previous checkpoint {tmp_path}" in text
    assert len(list(tmp_path.glob("checkpoint.pt.*.damaged"))) == 1  # kept, not overwritten
    assert torch.load(newest, weights_only=True)["trainer"]["iteration"] == 8


def test_resume_applies_a_changed_learning_rate_and_schedule_length_and_says_so(tmp_path, caplog):
    engine, _, _ = _toy(tmp_path, lr=1e-3, t_total=8)
    engine.run(list(range(4)), max_epochs=1)
    engine, optimizer, scheduler = _toy(tmp_path, lr=1e-2, t_total=16)  # --learning_rate 0.01 --max_epochs 4
    with caplog.at_level("WARNING"):
        engine.run(list(range(4)), max_epochs=4)
    assert "lr_scheduler t_total 8 -> 16" in caplog.text and "base_lrs [0.001] -> [0.01]" in caplog.text
    assert "max_epochs 1 -> 4" in caplog.text
    assert scheduler.t_total == 16 and scheduler.base_lrs == [0.01]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(_lr_after(16, 1e-2, 16), abs=1e-12)


def test_resume_with_another_data_recipe_is_refused_naming_both_values(tmp_path):
    recipe = {"format": 1, "version": "0.1.0", "roi_size": [64, 64, 64], "loss": "DiceCELoss"}
    engine, _, _ = _toy(tmp_path, recipe=recipe)
    engine.run(list(range(2)), max_epochs=1)
    engine, _, _ = _toy(tmp_path, recipe={**recipe, "version": "0.2.0", "roi_size": [96, 96, 96], "loss": "DiceLoss"})
    with pytest.raises(CheckpointError, match=r"roi_size=\[64, 64, 64\] \(this run: roi_size=\[96, 96, 96\]\); loss="):
        engine.run(list(range(2)), max_epochs=2)


def test_stale_temporaries_of_killed_saves_are_removed_but_not_a_live_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"iteration": 1}, path)
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".checkpoint.pt.{host}.{dead.pid}.abc123.tmp"
    live = tmp_path / f".checkpoint.pt.{host}.{os.getpid()}.def456.tmp"
    legacy = tmp_path / ".checkpoint.pt.ghi789.tmp"  # the older unnamed form, from before
    for f in (stale, live, legacy):
        f.write_bytes(b"")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    assert sorted(remove_stale_temporaries(path)) == sorted([stale, legacy])
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", live.name])
