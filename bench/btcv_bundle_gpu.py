"""Measure the BTCV bundle's full-size recipe on one GPU, through the bundle's own configs.

    python bench/btcv_bundle_gpu.py --sample_dir ../shared/data/ct_sample --out results.json

What it runs (in-process ``monai.bundle.ConfigWorkflow``, the same configs users run):
1. training, feature_size 48, 96^3 crops, 4 crops per step, AMP, on the real CT sample resampled to
   the recipe spacing (1.5 x 1.5 x 2.0 mm), once with gradient checkpointing (the default) and once
   without: median seconds per step after warm-up, crops per second, peak GPU memory;
2. inference (``configs/inference.json``) on ``ct_full.nii.gz`` (about 244 x 202 x 168 voxels at the
   recipe spacing), end to end per volume: load, resample, sliding window 96^3 (sw_batch_size 4,
   overlap 0.5, gaussian), invert, save; median over three copies after a warm-up volume.

The weights are those of the short training run: timing, not accuracy. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "swin_unetr_btcv"
sys.path.insert(0, str(REPO))


def _stamper() -> tuple[list[float], Callable]:
    """A list and an engine handler that appends the (GPU-synchronised) time to it."""
    stamps: list[float] = []

    def stamp(_: object) -> None:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    return stamps, stamp


def bench_args(doc: str, default_out: str) -> argparse.Namespace:
    """The command line both GPU benches share: --sample_dir, --out, --steps."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--sample_dir", default=str(REPO.parent / "shared" / "data" / "ct_sample"))
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--steps", type=int, default=12, help="training steps timed (after 2 warm-up steps)")
    return parser.parse_args()


def gpu_header(recipe: str) -> dict | None:
    """Device and versions for a result file; None (and a message) without a CUDA GPU."""
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return None
    import monai

    return {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "monai": monai.__version__,
        "recipe": recipe,
    }


def time_training(bundle: Path, overrides: dict, steps: int, state_file: Path | None = None) -> dict:
    """Run ``bundle``'s train.json in-process for ``steps`` steps: median s/step after 2 warm-up steps, peak memory."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"),
        workflow_type="train",
        bundle_root=str(bundle),
        max_epochs=1,
        epoch_length=steps,
        val_interval=1000,
        num_workers=4,
        resume=False,
        **overrides,
    )
    wf.initialize()
    if "prepare_corpus" in wf.parser:  # the SSL bundle's dataset reads the preprocessed corpus
        wf.parser.get_parsed_content("prepare_corpus")()
    trainer = wf.parser.get_parsed_content("train#trainer")
    stamps, stamp = _stamper()
    trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    torch.cuda.reset_peak_memory_stats()
    wf.run()
    per_step = statistics.median(
        [b - a for a, b in zip(stamps[2:], stamps[3:], strict=False)]
    )  # skip two warm-up steps
    crops = wf.parser.get_parsed_content("num_samples") * wf.parser.get_parsed_content("batch_size")
    result = {
        "steps_timed": len(stamps) - 3,
        "crops_per_step": crops,
        "seconds_per_step_median": round(per_step, 4),
        "crops_per_second": round(crops / per_step, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    if state_file is not None:
        torch.save(wf.parser.get_parsed_content("network").state_dict(), state_file)
    del wf, trainer
    torch.cuda.empty_cache()
    return result


def train(dataset: Path, work: Path, use_checkpoint: bool, steps: int) -> dict:
    overrides = {
        "dataset_dir": str(dataset),
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "outputs"),
        "use_checkpoint": use_checkpoint,
    }
    (work / "models").mkdir(parents=True, exist_ok=True)
    return {"use_checkpoint": use_checkpoint, **time_training(BUNDLE, overrides, steps, work / "models" / "model.pt")}


def infer(ct_full: Path, work: Path, copies: int = 3) -> dict:
    from ignite.engine import Events

    inp = work / "infer_in"
    inp.mkdir()
    for i in range(copies + 1):
        shutil.copy(ct_full, inp / f"ct_full_{i}.nii.gz")
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "inference.json"),
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        ckpt_dir=str(work / "models"),
        input_dir=str(inp),
        output_dir=str(work / "segs"),
    )
    wf.initialize()
    evaluator = wf.parser.get_parsed_content("evaluator")
    stamps, stamp = _stamper()
    evaluator.add_event_handler(Events.ITERATION_STARTED, stamp)
    evaluator.add_event_handler(Events.COMPLETED, stamp)
    torch.cuda.reset_peak_memory_stats()
    wf.run()
    per_volume = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=False)]
    import nibabel as nib

    shape = nib.load(str(next((work / "segs").glob("*.nii.gz")))).shape
    return {
        "output_shape_on_input_grid": list(shape),
        "seconds_per_volume_all": [round(t, 3) for t in per_volume],
        "seconds_per_volume_median_after_warmup": round(statistics.median(per_volume[1:]), 3),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "note": "end to end per volume, data loading (next item) included: load, resample to 1.5x1.5x2 mm, "
        "sliding window 96^3 sw4 overlap 0.5 gaussian, invert, save",
    }


def main() -> int:
    args = bench_args(__doc__, "btcv_bundle_gpu.json")
    results = gpu_header("feature_size 48, roi 96^3, batch 1 x 4 crops, AMP fp16, AdamW, pixdim 1.5x1.5x2.0")
    if results is None:
        return 2
    from bundles.sample_data import prepare_sample_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = tmp / "data"
        prepare_sample_dataset(dataset, args.sample_dir)
        results["train"] = []
        for use_checkpoint in (True, False):
            work = tmp / f"train_ckpt{int(use_checkpoint)}"
            results["train"].append(train(dataset, work, use_checkpoint, args.steps))
            print(json.dumps(results["train"][-1]), flush=True)
        results["inference"] = infer(Path(args.sample_dir) / "ct_full.nii.gz", tmp / "train_ckpt1")
        print(json.dumps(results["inference"]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
