"""Long runs (issue 17): stop on SIGTERM/SIGUSR1 with a checkpoint, checkpoint_interval, two generations,
resume with a changed recipe. In-process tests on a toy engine, then real bundle subprocesses sent real signals."""

from __future__ import annotations

import json
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
from helpers import BTCV, TORCHRUN, btcv_overrides, bundle_command, run_bundle
from ignite.engine import Engine, Events
from monai.optimizers import WarmupCosineSchedule

from custom.engines.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted
from custom.engines.training_checkpoint import TrainingCheckpoint
from custom.networks.weight_files import CheckpointError
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
    with pytest.raises(TrainingPreempted, match=r"SIGTERM \(received at iteration 3\): stopped after iteration 3") as e:
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
        lambda e: (
            its.append(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["trainer"]["iteration"])
            if (tmp_path / "checkpoint.pt").exists()
            else its.append(None)
        ),
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


# -- real bundle runs, real signals ---------------------------------------------------------------
def _overrides(tmp: Path, dataset: Path, **extra) -> dict:
    return btcv_overrides(
        dataset, tmp, **{"max_epochs": 1, "epoch_length": 3, "warmup_epochs": 1, "val_interval": 100, **extra}
    )


def _signal_after_an_iteration(
    overrides: dict,
    sig: int = signal.SIGTERM,
    after: str = "Iter: ",
    configs: tuple[str, ...] = ("configs/train.json",),
    python_args: tuple[str, ...] = (),
) -> tuple[int, str]:
    """Start ``run training``, send ``sig`` once a log line says an iteration completed; its status and output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONWARNINGS"] = "ignore"
    cmd = bundle_command("training", list(configs), overrides)
    cmd[1:1] = python_args
    proc = subprocess.Popen(
        cmd, cwd=BTCV, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace"
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if after in line and "train_loss" in line:
                proc.send_signal(sig)
                break
        lines.extend(proc.stdout)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines)


def _no_temporaries(models: Path) -> None:
    assert not [p.name for p in models.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, sample_dataset) -> dict:
    """SIGTERM mid-epoch, then a resume with --learning_rate 0.01 --max_epochs 2 signalled again, then the same."""
    tmp = tmp_path_factory.mktemp("preempted")
    models = tmp / "models"
    first = _overrides(tmp, sample_dataset)
    code1, out1 = _signal_after_an_iteration(first, signal.SIGTERM, after="Iter: 1/3")
    at1 = torch.load(models / "checkpoint.pt", weights_only=True)["trainer"]["iteration"]
    shutil.copy(models / "checkpoint.pt", tmp / "first.pt")
    changed = {**first, "learning_rate": 0.01, "max_epochs": 2}
    code2, out2 = _signal_after_an_iteration(changed, signal.SIGUSR1)
    state2 = torch.load(models / "checkpoint.pt", weights_only=True)
    _no_temporaries(models)
    third = run_bundle("training", ["configs/train.json"], changed)
    return {
        "models": models,
        "first": tmp / "first.pt",
        "runs": [(code1, out1, at1), (code2, out2, state2), third],
        "final": torch.load(models / "checkpoint.pt", weights_only=True),
    }


def test_sigterm_mid_epoch_saves_the_iteration_and_exits_with_the_preempted_status(preempted):
    # before: the process died of the signal (-15), nothing saved, a zero-byte .checkpoint.pt.*.tmp left
    code, out, at = preempted["runs"][0]
    assert code == PREEMPTED_EXIT_CODE, out[-3000:]
    said = re.search(r"SIGTERM \(received at iteration (\d+)\): stopped after iteration (\d+)", out)
    # sent once iteration 1 was logged: it arrives while iteration 2 fetches its batch or runs; 2 is saved
    assert said and int(said.group(1)) in (1, 2) and int(said.group(2)) == at == 2, out[-3000:]  # mid-epoch
    assert "Epoch[1] Complete" not in out


def test_the_resume_continues_the_epoch_with_a_changed_learning_rate_and_length_applied(preempted):
    code, out, state = preempted["runs"][1]
    models = preempted["models"]
    assert code == PREEMPTED_EXIT_CODE and "SIGUSR1" in out, out[-3000:]
    assert f"resumed from {models / 'checkpoint.pt'}: epoch 0, iteration 2" in out
    assert "max_epochs 1 -> 2" in out and "lr_scheduler t_total 3 -> 6" in out and "base_lrs [0.0001] -> [0.01]" in out
    at = state["trainer"]["iteration"]
    assert 3 <= at < 6 and state["lr_scheduler"]["base_lrs"] == [0.01]
    # the schedule a fresh run with lr 0.01 and 2 x 3 steps has at that step: continued, not restarted
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = WarmupCosineSchedule(opt, warmup_steps=3, t_total=6)
    for _ in range(at):
        opt.step()
        sched.step()
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)


def test_the_same_command_then_finishes_without_repeating_an_iteration(preempted):
    _, _, state = preempted["runs"][1]
    third = preempted["runs"][2]
    at = state["trainer"]["iteration"]
    assert f"epoch {at // 3}, iteration {at}" in third.stdout and "differ from the checkpoint" not in third.stdout
    iterations = [int(m) for m in re.findall(r"Epoch: \d+/2, Iter: (\d+)/3", third.stdout)]
    assert len(iterations) == 6 - at  # only the iterations left
    assert preempted["final"]["trainer"]["iteration"] == 6
    _no_temporaries(preempted["models"])


def test_resume_with_another_roi_size_is_refused_naming_both_values(tmp_path, sample_dataset, preempted):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(preempted["first"], models / "checkpoint.pt")  # iteration 2 of 3, roi 64^3
    before = (models / "checkpoint.pt").read_bytes()
    args = _overrides(tmp_path, sample_dataset, max_epochs=2, roi_size=[96, 96, 96])
    proc = run_bundle("training", ["configs/train.json"], args, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "roi_size=[64, 64, 64] (this run: roi_size=[96, 96, 96])" in text and "--resume False" in text
    assert (models / "checkpoint.pt").read_bytes() == before


def test_a_truncated_checkpoint_resumes_from_the_previous_and_a_worse_validation_keeps_model_pt(
    tmp_path, sample_dataset, preempted
):
    models = tmp_path / "models"
    models.mkdir()
    good = torch.load(preempted["first"], weights_only=True)  # iteration 2 of 3
    good["validator"] = {"best_metric": 0.99, "best_metric_epoch": 0}  # the best model.pt had Dice 0.99
    torch.save(good, models / "checkpoint.prev.pt")
    raw = (preempted["models"] / "checkpoint.pt").read_bytes()
    (models / "checkpoint.pt").write_bytes(raw[: len(raw) // 2])
    (models / "model.pt").write_bytes(b"the best model so far")
    args = _overrides(tmp_path, sample_dataset, max_epochs=1, val_interval=1)
    proc = run_bundle("training", ["configs/train.json"], args)
    text = proc.stdout + proc.stderr
    assert f"{models / 'checkpoint.pt'} is truncated or damaged" in text
    assert f"Resuming from the previous checkpoint {models / 'checkpoint.prev.pt'}" in text
    assert "val_mean_dice" in text  # a validation ran, worse than 0.99
    assert (models / "model.pt").read_bytes() == b"the best model so far"
    # model.pt may be newer than the previous generation's best: a copy is kept before this run could replace it
    assert [b.read_bytes() for b in models.glob("model.pt.*.bak")] == [b"the best model so far"]
    final = torch.load(models / "checkpoint.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 3 and final["validator"]["best_metric"] == pytest.approx(0.99)
    assert len(list(models.glob("checkpoint.pt.*.damaged"))) == 1


def test_under_torchrun_every_rank_stops_at_the_same_iteration_and_rank_0_writes(tmp_path, sample_dataset):
    """SIGTERM to torchrun's agent: it forwards the signal to both workers; they agree on one iteration."""
    models = tmp_path / "models"
    data = tmp_path / "data"  # two cases, one per rank (the sample dataset trains on one)
    case = []
    for i in (1, 2):
        for kind, name in (("imagesTr", "img"), ("labelsTr", "label")):
            (data / kind).mkdir(parents=True, exist_ok=True)
            os.symlink((sample_dataset / kind / f"{name}0001.nii.gz").resolve(), data / kind / f"{name}000{i}.nii.gz")
        case.append({"image": f"imagesTr/img000{i}.nii.gz", "label": f"labelsTr/label000{i}.nii.gz"})
    (data / "dataset_0.json").write_text(json.dumps({"training": case, "validation": case}), encoding="utf-8")
    args = _overrides(tmp_path, data, max_epochs=2)
    configs = ("configs/train.json", "configs/multi_gpu_train.json")
    code, out = _signal_after_an_iteration(args, after="Iter: 1/3", configs=configs, python_args=TORCHRUN)
    assert code != 0 and (models / "checkpoint.pt").is_file(), out[-6000:]
    stops = re.findall(r"stopped after iteration (\d+)", out)
    saved = torch.load(models / "checkpoint.pt", weights_only=True)["trainer"]["iteration"]
    assert stops and set(stops) == {str(saved)} and 2 <= saved < 6, out[-3000:]
    assert len(re.findall(r"INFO - saved " + re.escape(str(models / "checkpoint.pt")), out)) == 1, out[-6000:]  # rank 0
    assert "SignalException" in out  # torchrun's own status is its signal's (the workers exit with 75)
    _no_temporaries(models)


def test_a_full_disk_during_a_rotating_save_leaves_both_generations_as_they_were(tmp_path):
    import errno

    from custom.utils import DiskFullError, atomic_write

    path, prev = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    atomic_torch_save({"iteration": 1}, path, previous=prev)
    atomic_torch_save({"iteration": 2}, path, previous=prev)

    def no_space(f):
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"the previous {path} is intact"):
        atomic_write(path, no_space, previous=prev)
    assert torch.load(path, weights_only=True) == {"iteration": 2}
    assert torch.load(prev, weights_only=True) == {"iteration": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]
