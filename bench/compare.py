"""This collection's defaults against the model zoo's recipe, measured side by side in one run.

    python -m bench.compare --size small            # this CPU: feature_size 12, 64^3 crops
    python -m bench.compare --size full             # a GPU: feature_size 48, 96^3 crops
    python -m bench.compare --parts infer --weights seeded   # inference alone, seeded untrained weights
    python -m bench.compare --report                # rewrite docs/benchmarks.md from bench/results/

Each measurement runs the bundles' own configs in a fresh process (``monai.bundle.ConfigWorkflow``,
what ``python -m monai.bundle run`` runs), the baseline being the same config with one override file
of ``bench/zoo_recipe/`` merged over it, so network, loss and deterministic preprocessing are equal:

1. fine-tuning (``swin_unetr_btcv/configs/train.json``, baseline ``zoo_recipe/train.json``): training
   crops per second in steady state, data loading included (the time between the first and the last
   timed iteration, after warm-up steps); peak memory;
2. inference (``configs/inference.json``, baseline ``zoo_recipe/inference.json``): seconds per volume
   end to end (load, resample, sliding window, invert, save) on copies of ``ct_full.nii.gz`` (about
   244 x 202 x 168 at the full size's 1.5 x 1.5 x 2 mm), median after the first volume, both
   with the same weights (those of this run's fine-tuning, or with ``--weights seeded`` seeded
   untrained ones and no fine-tuning), and the voxel agreement of the two label maps. Ours runs the
   body crop (``body_crop``, on by default: the windows wholly in the air are not run); the zoo recipe
   slides over the whole image (``zoo_recipe/inference.json`` sets ``body_crop`` false). A third
   row, ``ours_no_crop``, is ours with ``body_crop`` false: the crop as a lever, its ratio and its
   agreement with ours. Each row reports the windows run per volume of the whole image's total
   (counted on the network's calls; the total from the crop's log of the last volume);
3. SSL pre-training (``swin_unetr_ssl/configs/train.json``, baseline ``zoo_recipe/ssl_train.json``:
   views made with per-sample loops and host round trips, ``bench/research_views.py``): steps per second.

Peak memory is the GPU's (``max_memory_allocated``) on a GPU, else the resident set (RSS) of the
process and of its largest DataLoader worker. The runs alternate baseline and ours ``--repeats``
times; the table gives medians and the ratio ours / baseline. Training on ct_full uses a label made
from HU thresholds (timing only: the crop sampler needs foreground, not anatomy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.child import ChildFailed, add_child_option, peak_rss_gib, run_child, serve_child
from bench.common import REPO, RESULTS, SAMPLE_DIR, SIZES, cpu_name, flop_utilisation

DOC = REPO / "docs" / "benchmarks.md"
ZOO = REPO / "bench" / "zoo_recipe"
BUNDLES = {"btcv": REPO / "swin_unetr_btcv", "ssl": REPO / "swin_unetr_ssl"}


# --------------------------------------------------------------------------------------------- child side
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return {"peak_rss_gib": peak_rss_gib(), "peak_worker_rss_gib": peak_rss_gib(children=True)}


def _workflow(bundle: str, config: str, baseline_file: str | None, workflow_type: str, overrides: dict):
    from monai.bundle import ConfigWorkflow

    files = [str(BUNDLES[bundle] / "configs" / config)] + ([str(ZOO / baseline_file)] if baseline_file else [])
    wf = ConfigWorkflow(config_file=files, workflow_type=workflow_type, bundle_root=str(BUNDLES[bundle]), **overrides)
    wf.initialize()
    return wf


def child_train(spec: dict) -> dict:
    """One training run; crops/s over the steps after ``--warmup``."""
    import torch
    from ignite.engine import Events

    bundle = "ssl" if spec["part"] == "ssl" else "btcv"
    baseline = {"btcv": "train.json", "ssl": "ssl_train.json"}[bundle] if spec["pipeline"] == "baseline" else None
    overrides = dict(spec["overrides"])
    overrides.update(max_epochs=1, epoch_length=spec["warmup"] + spec["steps"], val_interval=10**6, resume=False)
    wf = _workflow(bundle, "train.json", baseline, "train", overrides)
    if bundle == "ssl":
        wf.parser.get_parsed_content("prepare_corpus")()
    trainer = wf.parser.get_parsed_content("train#trainer")
    stamps: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: (_sync(), stamps.append(time.perf_counter())))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    wf.run()
    crops = wf.parser.get_parsed_content("batch_size") * wf.parser.get_parsed_content("num_samples")
    timed = stamps[spec["warmup"] - 1 :]  # interval from the last warm-up step to the last step
    seconds = timed[-1] - timed[0]
    result = {
        "crops_per_step": crops,
        "steps_timed": len(timed) - 1,
        "seconds_per_step": round(seconds / (len(timed) - 1), 4),
        "crops_per_second": round(crops * (len(timed) - 1) / seconds, 3),
        "startup_seconds": round(stamps[0] - start, 1),
        **_peak_memory(),
    }
    if spec["state_out"]:
        net = wf.parser.get_parsed_content("network")
        torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, spec["state_out"])
    return result


def child_infer(spec: dict) -> dict:
    """Inference over the copies in ``input_dir``: seconds per volume (first one apart), windows run per volume."""
    import torch
    from ignite.engine import Events

    overrides = dict(spec["overrides"])
    baseline = "inference.json" if spec["pipeline"] == "baseline" else None
    wf = _workflow("btcv", "inference.json", baseline, "infer", overrides)
    evaluator = wf.parser.get_parsed_content("evaluator")
    windows = [0]
    network = wf.parser.get_parsed_content("network")
    network.register_forward_pre_hook(lambda _, inputs: windows.__setitem__(0, windows[0] + inputs[0].shape[0]))
    stamps: list[float] = []
    stamp = lambda _: (_sync(), stamps.append(time.perf_counter()))  # noqa: E731
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    stamps.append(time.perf_counter())
    wf.run()
    per_volume = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=False)]
    run = windows[0] // len(per_volume)  # the copies are one image: the same windows each
    last = getattr(wf.parser.get_parsed_content("inferer"), "last_windows", None)  # BodyCropInferer's (run, total)
    return {
        "first_volume_seconds": round(per_volume[0], 3),
        "seconds_per_volume": round(statistics.median(per_volume[1:]), 3),
        "volumes_timed": len(per_volume) - 1,
        "windows_run": run,
        "windows_total": last[1] if last else run,
        **_peak_memory(),
    }


# -------------------------------------------------------------------------------------------- parent side
def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {cpu_name()}"


def make_data(work: Path, sample_dir: Path, copies: int) -> dict:
    """ct_full with a HU-threshold label (4 training entries), the SSL sample lists, inference copies."""
    import nibabel as nib
    import numpy as np

    from bundles.sample_data import prepare_sample_dataset

    ct = sample_dir / "ct_full.nii.gz"
    img = nib.load(str(ct))
    hu = np.asarray(img.dataobj)
    label = np.zeros(hu.shape, np.uint8)
    label[(hu > 20) & (hu < 90)] = 6  # soft tissue, "liver"-like
    label[hu > 300] = 1  # bone: a second foreground class
    data = work / "data"
    (data / "labelsTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(label, img.affine), str(data / "labelsTr" / "ct_full_label.nii.gz"))
    case = {"image": str(ct.resolve()), "label": str(data / "labelsTr" / "ct_full_label.nii.gz")}
    datalist = {"training": [case] * 4, "validation": [case]}
    (data / "bench_dataset.json").write_text(json.dumps(datalist, indent=4), encoding="utf-8")
    prepare_sample_dataset(data, sample_dir)  # the BTCV-layout sample: its slab validates SSL
    infer_in = work / "infer_in"
    infer_in.mkdir()
    for i in range(copies + 1):
        shutil.copy(ct, infer_in / f"ct_full_{i}.nii.gz")
    # SSL: 4 volumes (batch 2 drops an incomplete last batch), the slab for validation
    (data / "ssl").mkdir()
    for i in range(4):
        os.symlink(ct.resolve(), data / "ssl" / f"ct_full_{i}.nii.gz")
    ssl = {
        "training": [{"image": f"ssl/ct_full_{i}.nii.gz"} for i in range(4)],
        "validation": [{"image": "imagesTr/img0001.nii.gz"}],
    }
    (data / "bench_ssl.json").write_text(json.dumps(ssl, indent=4), encoding="utf-8")
    return {"data": data, "infer_in": infer_in}


def child(spec: dict) -> dict:
    """In the measurement's own process (:func:`bench.child.run_child`): one training or inference run."""
    return child_train(spec) if spec["mode"] == "train" else child_infer(spec)


def run_measurement(
    mode: str, part: str, pipeline: str, overrides: dict, args: argparse.Namespace, state_out: str = ""
) -> dict:
    """One :func:`child` in a fresh process; its result, printed.

    Raises:
        ChildFailed: the process failed (the part records the error).
    """
    spec = {"mode": mode, "part": part, "pipeline": pipeline, "overrides": overrides}
    spec.update(steps=args.steps, warmup=args.warmup, state_out=state_out)
    result = run_child("bench.compare", spec, check=True).result
    print(f"  {part:<5} {pipeline:<8} {json.dumps(result)}", flush=True)
    return result


def agreement(a: Path, b: Path) -> float:
    import nibabel as nib
    import numpy as np

    x, y = (np.asarray(nib.load(str(p)).dataobj) for p in (a, b))
    if x.shape != y.shape:
        raise SystemExit(f"label maps differ in shape: {a} {x.shape}, {b} {y.shape}")
    return float((x == y).mean())


def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 4)


def benchmark(args: argparse.Namespace, out: Path) -> dict:
    """Run the parts; ``out`` is rewritten after each, so a run cut short keeps what it measured."""
    import torch

    gpu = torch.cuda.is_available()
    size = SIZES[args.size]
    work = Path(tempfile.mkdtemp(prefix="swin_bench_"))
    paths = make_data(work, Path(args.sample_dir), args.copies)
    common = {**size, "amp": gpu, "preflight": False}
    result: dict = {
        "command": "python -m bench.compare " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "device": _device_name(),
        "versions": _versions(),
        "size": {"name": args.size, **size},
        "repeats": args.repeats,
    }
    parts = args.parts.split(",")
    state = work / "ours_model.pt"

    def alternate(
        name: str,
        mode: str,
        part: str,
        overrides,
        key: str,
        higher_is_better: bool = True,
        pipelines: tuple[str, ...] = ("baseline", "ours"),
    ) -> bool:
        """``--repeats`` rounds of each pipeline in turn; the summary (or the error) goes into ``result[name]``."""
        runs: dict[str, list] = {pipeline: [] for pipeline in pipelines}
        try:
            for r in range(args.repeats):
                for pipeline in runs:
                    keep = str(state) if (name, pipeline, r) == ("train", "ours", 0) else ""
                    runs[pipeline].append(
                        run_measurement(mode, part, pipeline, {**common, **overrides(pipeline, r)}, args, keep)
                    )
        except ChildFailed as e:  # keep measuring the other parts
            result[name] = {"error": str(e)[-2000:]}
            print(f"{name} failed:\n{e}", flush=True)
            out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            return False
        result[name] = _summary(runs, key, higher_is_better)
        return True

    def run_dirs(prefix: str, pipeline: str, r: int) -> dict:
        run_dir = work / f"{prefix}_{pipeline}_{r}"
        return {"ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "outputs")}

    seeded = args.weights == "seeded"
    if "train" in parts or ("infer" in parts and not seeded):
        ok = alternate(
            "train",
            "train",
            "train",
            lambda pipeline, r: {
                "dataset_dir": str(paths["data"]),
                "datalist": str(paths["data"] / "bench_dataset.json"),
                "num_workers": 4 if pipeline == "baseline" else min(4, os.cpu_count() or 1),
                **run_dirs("train", pipeline, r),
            },
            "crops_per_second",
        )
        if ok:  # pipeline rate, data loading included
            rate = result["train"]["ours"]["crops_per_second"]
            mfu = flop_utilisation(rate, result["device"], size["feature_size"], size["roi_size"][0])
            if mfu is not None:
                result["train"]["model_flop_utilisation"] = mfu
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if "infer" in parts and "error" not in result.get("train", {}):
        ckpt = work / "infer_models"
        ckpt.mkdir()
        if seeded:  # no fine-tuning: the bundle's network, seeded, untrained (speed does not depend on training)
            from monai.networks.nets import SwinUNETR

            torch.manual_seed(0)
            torch.save(SwinUNETR(1, 14, feature_size=size["feature_size"]).state_dict(), ckpt / "model.pt")
            result["weights"] = "seeded untrained (--weights seeded): agreement of an untrained network's argmax"
        else:
            shutil.copy(state, ckpt / "model.pt")  # the same weights for every pipeline
        ok = alternate(
            "infer",
            "infer",
            "infer",
            lambda pipeline, r: {
                "ckpt_dir": str(ckpt),
                "input_dir": str(paths["infer_in"]),
                "output_dir": str(work / f"segs_{pipeline}_{r}"),
                **({"body_crop": False} if pipeline == "ours_no_crop" else {}),
            },
            "seconds_per_volume",
            higher_is_better=False,
            pipelines=("baseline", "ours", "ours_no_crop"),
        )
        if ok:
            seg = "ct_full_0_seg.nii.gz"
            result["infer"]["label_agreement"] = round(
                agreement(work / "segs_baseline_0" / seg, work / "segs_ours_0" / seg), 5
            )
            result["infer"]["label_agreement_ours_no_crop"] = round(
                agreement(work / "segs_ours_no_crop_0" / seg, work / "segs_ours_0" / seg), 5
            )
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if "ssl" in parts:
        alternate(
            "ssl",
            "train",
            "ssl",
            lambda pipeline, r: {
                "dataset_dir": str(paths["data"]),
                "datalist": [str(paths["data"] / "bench_ssl.json")],
                "cache_dir": str(work / "ssl_cache"),
                "num_workers": min(4, os.cpu_count() or 1),
                "warmup_steps": 2,
                **run_dirs("ssl", pipeline, r),
            },
            "crops_per_second",
        )
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    return result


def _summary(runs: dict[str, list], key: str, higher_is_better: bool = True) -> dict:
    out = {}
    for pipeline, rs in runs.items():
        keys = [k for k in rs[0] if isinstance(rs[0][k], (int, float))]
        out[pipeline] = {k: _median(rs, k) for k in keys}
        out[pipeline]["all_" + key] = [r[key] for r in rs]
    b = out["baseline"][key]
    for pipeline in runs:
        if pipeline != "baseline":
            o = out[pipeline][key]
            out["ratio" if pipeline == "ours" else f"ratio_{pipeline}"] = round(o / b if higher_is_better else b / o, 2)
    return out


def _versions() -> dict:
    import monai
    import numpy
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
    }


# ------------------------------------------------------------------------------------------------ report
def _mem(d: dict) -> str:
    if "peak_gpu_memory_gib" in d:
        return f"{d['peak_gpu_memory_gib']} GiB GPU"
    return f"{d['peak_rss_gib']} GiB RSS (+ worker {d['peak_worker_rss_gib']})"


def markdown(result: dict) -> str:
    s = result["size"]
    rows = [
        f"### {result['device']}, {s['name']} size (feature_size {s['feature_size']}, {s['roi_size'][0]}^3 crops, "
        f"{' x '.join(str(p) for p in s['pixdim'])} mm), "
        f"{result['date']}",
        "",
        f"`{result['command']}`; torch {result['versions']['torch']}, MONAI {result['versions']['monai']}, "
        f"medians of {result['repeats']} alternating runs each.",
        "",
        *([f"Note: {result['note']}", ""] if "note" in result else []),
        *([f"Weights: {result['weights']}.", ""] if "weights" in result else []),
        "| measure | zoo recipe | ours | ratio (ours / zoo) |",
        "|---|---|---|---|",
    ]
    labels = {"train": "fine-tuning", "infer": "inference", "ssl": "SSL pre-training"}
    for part, (key, unit) in {
        "train": ("crops_per_second", "crops/s"),
        "infer": ("seconds_per_volume", "s/volume"),
        "ssl": ("crops_per_second", "crops/s"),
    }.items():
        t = result.get(part)
        if t is None:
            continue
        if "error" in t:
            rows.append(f"| {labels[part]} | failed: see the result file | | |")
            continue
        rows.append(f"| {labels[part]}, {unit} | {t['baseline'][key]} | {t['ours'][key]} | **{t['ratio']}** |")
        rows.append(f"| {labels[part]}, peak memory | {_mem(t['baseline'])} | {_mem(t['ours'])} | |")
        if "windows_run" in t["ours"]:
            b, o = t["baseline"], t["ours"]
            rows.append(
                f"| {labels[part]}, windows run per volume (of the whole image's) | {b['windows_run']:g} of "
                f"{b['windows_total']:g} | {o['windows_run']:g} of {o['windows_total']:g} (body crop) | |"
            )
        if "ours_no_crop" in t:
            n = t["ours_no_crop"]
            rows.append(
                f"| {labels[part]} without the body crop (lever), {unit} | | {n[key]} ({n['windows_run']:g} "
                f"windows, {_mem(n)}) | {t['ratio_ours_no_crop']} |"
            )
        if "model_flop_utilisation" in t:
            rows.append(f"| {labels[part]}, model FLOP utilisation | | {t['model_flop_utilisation']:.1%} | |")
        if "label_agreement" in t:
            rows.append(f"| {labels[part]}, voxels with the same label | | {t['label_agreement']:.2%} | |")
        if "label_agreement_ours_no_crop" in t:
            rows.append(
                f"| {labels[part]}, voxels with the same label, ours with and without the crop | | "
                f"{t['label_agreement_ours_no_crop']:.2%} | |"
            )
    return "\n".join(rows) + "\n"


def levers_markdown(result: dict, name: str) -> str:
    """The tables of one ``bench/levers.py`` result file."""
    rows = [
        f"### Levers alone: {result['device']}, feature_size {result['feature_size']}, {result['roi']}^3, "
        f"torch {result['torch']}",
        "",
        *([f"Note: {result['note']}", ""] if "note" in result else []),
    ]
    if result["train"]:
        rows += [
            "| training step, 4 crops (each row adds to the rows above) | s/step | crops/s | peak GPU memory | MFU |",
            "|---|---|---|---|---|",
        ]
    for r in result["train"]:
        if "error" in r:
            rows.append(f"| {r['row']} | failed: {r['error'][:80]} | | | |")
            continue
        mfu = f"{r['model_flop_utilisation']:.1%}" if "model_flop_utilisation" in r else ""
        mem = f"{r['peak_gpu_memory_gib']} GiB" if "peak_gpu_memory_gib" in r else ""
        rows.append(f"| {r['row']} | {r['seconds_per_step']} | {r['crops_per_second']} | {mem} | {mfu} |")
    if result["infer"]:
        rows += [
            "",
            "| sliding-window inference, one volume (each row adds to the rows above) | s/volume | peak GPU memory |",
            "|---|---|---|",
        ]
        for r in result["infer"]:
            mem = f"{r['peak_gpu_memory_gib']} GiB" if "peak_gpu_memory_gib" in r else ""
            rows.append(f"| {r['row']} | {r.get('seconds_per_volume', 'failed')} | {mem} |")
    return "\n".join(rows) + f"\n\nRaw figures: `bench/results/{name}`.\n"


def write_report() -> Path:
    """Rewrite the results part of docs/benchmarks.md (below its ``<!-- results -->`` line)."""
    intro = DOC.read_text(encoding="utf-8").split("<!-- results -->")[0] if DOC.is_file() else "# Benchmarks\n\n"
    body = [
        markdown(json.loads(f.read_text(encoding="utf-8"))) + f"\nRaw figures: `bench/results/{f.name}`.\n"
        for f in sorted(RESULTS.glob("compare_*.json"))
    ]
    body += [
        levers_markdown(json.loads(f.read_text(encoding="utf-8")), f.name)
        for f in sorted(RESULTS.glob("levers_*.json"))
    ]
    DOC.write_text(intro + "<!-- results -->\n\n" + "\n".join(body), encoding="utf-8")
    return DOC


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--parts", default="train,infer,ssl", help="comma-separated: train, infer, ssl")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="training steps before timing starts")
    parser.add_argument("--copies", type=int, default=2, help="inference volumes timed after the first")
    parser.add_argument(
        "--weights",
        choices=["trained", "seeded"],
        default="trained",
        help="inference weights: this run's fine-tuning (default), or seeded untrained ones (--parts infer alone)",
    )
    parser.add_argument("--sample_dir", default=str(SAMPLE_DIR))
    parser.add_argument(
        "--out", default="", help="result JSON (default bench/results/compare_<device>_<size>_<date>.json)"
    )
    parser.add_argument("--report", action="store_true", help="only rewrite docs/benchmarks.md from bench/results/")
    add_child_option(parser)
    args = parser.parse_args()
    if args.child:
        return serve_child(args.child, child)
    if args.report:
        print(f"wrote {write_report()}")
        return 0
    tag = _device_name().split(",")[0].replace(" ", "_").replace("/", "_")
    out = Path(args.out or RESULTS / f"compare_{tag}_{args.size}_{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = benchmark(args, out)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("\n" + markdown(result))
    print(f"wrote {out}; `python -m bench.compare --report` puts it into {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
