"""``make demo``: the paper's pipeline end to end on the project's real CT sample, through the bundle commands.

1. import the slab's TotalSegmentator labels into the 13 BTCV classes (``custom.tools.label_import``),
2. pre-train the Swin encoder self-supervised on ``ct_full.nii.gz`` with the SSL bundle
   (``swin_unetr_ssl``, ``run training``): inpainting + rotation + contrastive, a few minutes,
3. fine-tune a small Swin UNETR (feature_size 12, 64^3 crops) from that encoder with the BTCV
   bundle's ``run training --pretrained_path .../model_swinvit.pt`` (all 126 encoder tensors matched),
4. evaluate it with ``run evaluating`` (metrics.json + PNG),
5. segment ``ct_full.nii.gz`` with ``run inference``,
6. print the per-organ Dice table and where everything is.

Demo sizes, not the recipe: one labelled 30-slice volume (validation is that same volume), 3 mm
voxels (the sample's own spacing; the recipe resamples to 1.5 x 1.5 x 2.0 mm), 64^3 crops and a few
dozen steps at a raised learning rate, so that it finishes in minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .sample_data import DEFAULT_SAMPLE_DIR, SMALL_SIZES, prepare_sample_dataset

__all__ = ["DEMO_OVERRIDES", "DEMO_RUNTIME", "DEMO_TRAINING", "bundle_command", "cli_args", "run_demo"]

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "swin_unetr_btcv"
SSL_BUNDLE = REPO / "swin_unetr_ssl"

#: the demo's sizes, shared by all three commands (see the module docstring for why)
DEMO_OVERRIDES = {**SMALL_SIZES, "amp": False, "num_workers": 0}
#: what evaluation and inference are given: run-time choices only; the sizes come from the recipe saved in
#: model.pt by the fine-tuning (``custom.networks.recipe``), so they are typed once, for training
DEMO_RUNTIME = {k: DEMO_OVERRIDES[k] for k in ("amp", "num_workers")}
#: training schedule of the demo: steps = epochs x epoch_length, two 64^3 crops per step
DEMO_TRAINING = {
    "max_epochs": 6,
    "epoch_length": 10,
    "val_interval": 6,
    "warmup_epochs": 0,
    "learning_rate": 1e-3,
    "num_samples": 2,
    "use_checkpoint": False,
    "resume": False,
}
#: self-supervised pre-training of the demo: 15 steps of 2 crops (4 views), native 3 mm voxels
DEMO_PRETRAINING = {
    "max_epochs": 3,
    "epoch_length": 5,
    "val_interval": 3,
    "warmup_steps": 2,
    "batch_size": 1,
    "num_samples": 2,
    "use_checkpoint": False,
    "resume": False,
}


def cli_args(overrides: dict) -> list[str]:
    """``{"roi_size": [64, 64, 64]}`` -> ``["--roi_size", "[64, 64, 64]"]`` (values as Python literals)."""
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", repr(v) if not isinstance(v, str) else v]
    return args


def bundle_command(run_id: str, config_files: list[str], overrides: dict) -> list[str]:
    """The ``python -m monai.bundle run`` command line a user would type inside the bundle folder."""
    files = config_files[0] if len(config_files) == 1 else repr(config_files)
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files, *cli_args(overrides)]


def _run_stage(name: str, cmd: list[str], log: Path, cwd: Path = BUNDLE) -> None:
    """Run one bundle command in its bundle folder; logs to ``log``, progress bars to the terminal."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"$ cd {cwd} && " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=None, env=env)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8").splitlines()[-25:]
        raise SystemExit(f"\n{name} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail))


def surface_distances(prediction: Path, label: Path, num_classes: int) -> list[float | None]:
    """HD95 in mm per organ (1..num_classes-1) of the label map evaluation wrote, on the label's own grid.

    ``custom.segmentation.metrics.case_metrics`` (MONAI's HD95 with the voxel spacing); None where the
    organ is missing from the prediction or the label (no distance is defined there).
    """
    import nibabel as nib
    import numpy as np

    from custom.segmentation.metrics import case_metrics

    ref = nib.load(str(label))
    pred = np.asarray(nib.load(str(prediction)).dataobj).astype(np.int64)
    truth = np.asarray(ref.dataobj).astype(np.int64)
    spacing = [float(s) for s in ref.header.get_zooms()[:3]]
    return case_metrics(pred, truth, list(range(1, num_classes)), spacing, nsd_tolerance_mm=2.0, hd95_empty=None)[
        "hd95"
    ]


def _dice_table(metrics: dict, hd95: list[float | None] | None = None) -> str:
    organs = list(metrics["class_dice"].items())
    hd95 = hd95 if hd95 is not None else [None] * len(organs)
    rows = [f"{'organ':<26} {'Dice':>6} {'HD95 mm':>8}", "-" * 42]
    for (organ, dice), hd in zip(organs, hd95, strict=True):
        rows.append(f"{organ:<26} {'-' if dice is None else f'{dice:.3f}':>6} {'-' if hd is None else f'{hd:.1f}':>8}")
    rows += ["-" * 42, f"{'mean (organs scored)':<26} {metrics['mean_dice']:.3f}"]
    rows.append("HD95 -: the organ is missing from the prediction or the label")
    return "\n".join(rows)


def run_demo(work_dir: Path, sample_dir: Path = DEFAULT_SAMPLE_DIR) -> dict:
    """Run the four demo stages in ``work_dir`` (its models/ and outputs/ are replaced); returns metrics."""
    work_dir = work_dir.resolve()
    for sub in ("models", "outputs", "segmentations", "logs", "ssl_models", "ssl_outputs"):
        shutil.rmtree(work_dir / sub, ignore_errors=True)
    (work_dir / "logs").mkdir(parents=True)
    data = work_dir / "data"
    paths = {"dataset_dir": str(data), "ckpt_dir": str(work_dir / "models"), "output_dir": str(work_dir / "outputs")}
    encoder = work_dir / "ssl_models" / "model_swinvit.pt"
    ssl = {
        "dataset_dir": str(data),
        "datalist": [str(data / "ssl_dataset.json")],
        "cache_dir": str(work_dir / "ssl_cache"),
        "ckpt_dir": str(encoder.parent),
        "output_dir": str(work_dir / "ssl_outputs"),
        **{k: v for k, v in DEMO_OVERRIDES.items() if k != "pixdim"},  # SSL keeps the native spacing (paper)
        **DEMO_PRETRAINING,
    }
    finetune = {**paths, **DEMO_OVERRIDES, **DEMO_TRAINING, "pretrained_path": str(encoder)}
    stages = [
        ("import labels", None),
        ("pretrain (SSL)", bundle_command("training", ["configs/train.json"], ssl)),
        ("fine-tune", bundle_command("training", ["configs/train.json"], finetune)),
        (
            "evaluate",
            bundle_command("evaluating", ["configs/train.json", "configs/evaluate.json"], {**paths, **DEMO_RUNTIME}),
        ),
        (
            "segment ct_full",
            bundle_command(
                "inference",
                ["configs/inference.json"],
                {**paths, "output_dir": str(work_dir / "segmentations"), **DEMO_RUNTIME},
            ),
        ),
    ]
    timings = {}
    with tqdm(total=len(stages), desc="demo", unit="stage", file=sys.stdout) as bar:
        for name, cmd in stages:
            bar.set_postfix_str(name)
            start = time.monotonic()
            if cmd is None:
                prepare_sample_dataset(data, sample_dir)
            else:
                cwd = SSL_BUNDLE if name.startswith("pretrain") else BUNDLE
                _run_stage(name, cmd, work_dir / "logs" / f"{name.split()[0]}.log", cwd)
            timings[name] = time.monotonic() - start
            bar.update(1)

    metrics = json.loads((work_dir / "outputs" / "metrics.json").read_text(encoding="utf-8"))
    loaded = [
        line.split(" - ")[-1]
        for line in (work_dir / "logs" / "fine-tune.log").read_text(encoding="utf-8").splitlines()
        if "encoder tensors" in line
    ]
    print(f"\nFine-tuning started from the pre-trained encoder: {loaded[0] if loaded else 'NOT LOADED'}")
    print("\nPer-organ Dice and HD95 on the labelled slab (also the training volume: this measures fit, not")
    print("generalisation), on the label's own grid, for the label map evaluation wrote")
    hd95 = surface_distances(
        work_dir / "outputs" / "img0001_seg.nii.gz",
        data / "labelsTr" / "label0001.nii.gz",
        len(metrics["class_dice"]) + 1,
    )
    print(_dice_table(metrics, hd95))
    stats = work_dir / "segmentations" / "ct_full_statistics.json"
    if stats.is_file():
        from custom.inference.statistics import statistics_table

        print("\nStatistics of the ct_full segmentation (per organ: volume from the input's voxel spacing, HU inside)")
        print(statistics_table(json.loads(stats.read_text(encoding="utf-8"))))
    print("\nTime per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print("\nOutputs")
    print(f"  dataset (imported labels): {data}")
    print(f"  pre-trained encoder:       {encoder} (released model_swinvit.pt layout)")
    print(f"  weights:                   {work_dir / 'models' / 'model.pt'}, checkpoint.pt beside it")
    print(f"  metrics and picture:       {work_dir / 'outputs' / 'metrics.json'}, {work_dir / 'outputs'}/img0001.png")
    print(f"  label map evaluated:       {work_dir / 'outputs' / 'img0001_seg.nii.gz'}")
    print(f"  TensorBoard logs:          {work_dir / 'outputs'}")
    print(f"  segmentation of ct_full:   {work_dir / 'segmentations' / 'ct_full_seg.nii.gz'}")
    print(
        f"  its preview and statistics: {work_dir / 'segmentations' / 'ct_full_preview.png'}, ct_full_statistics.json"
    )
    print(f"  command logs:              {work_dir / 'logs'}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bundles demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work_dir", default=str(REPO / "demo_work"), help="where the demo writes (default demo_work/)"
    )
    parser.add_argument("--sample_dir", default=str(DEFAULT_SAMPLE_DIR), help="the shared CT sample folder")
    args = parser.parse_args(argv)
    run_demo(Path(args.work_dir), Path(args.sample_dir))
    return 0
