"""Feeding SSL pre-training crops: RAM and crops/s of three data paths, for a small and a larger corpus.

    python -m bench.ssl_data_bench --sizes 4 32 --batches 20 --num_workers 2 --out results.json

The corpus is synthetic CT (int16 HU, .nii.gz, 192 x 192 x 128 voxels by default, 1.5 x 1.5 x 2 mm:
air at or below -1000 HU around an elliptical body with fat, soft tissue, lungs and a spine, with
noise). Each path delivers ``num_samples`` random ROI crops (96^3) per volume, through
``monai.data.DataLoader`` with ``batch_size`` volumes per batch (so ``batch_size * num_samples``
crops per batch), volumes drawn at random with replacement:

a. ``Dataset``: LoadImaged -> Orientationd -> ScaleIntensityRanged -> CropForegroundd -> SpatialPadd
   -> RandSpatialCropSamplesd, every item decoded from NIfTI (the paper's pipeline without a cache);
b. ``CacheDataset`` of the same chain: the deterministic part cached in RAM once (setup time), the
   random crop per item (RAM grows with the corpus);
c. ``preprocess_corpus`` once (its time reported apart, like b's caching), then ``MemmapCropDataset``.

Each measurement runs in a fresh Python process, so peaks do not carry over. Crops/s: over
``--batches`` batches after one warm-up batch (worker start-up excluded). RAM: peak resident set of
the process plus its DataLoader workers, as the sum of each one's VmHWM (counts pages shared between
the workers once per process: an upper bound) and as the peak of their summed PSS (shared pages split
between the processes) with its anonymous part (memory that cannot be dropped; the rest is page cache
mapped from files), sampled every 50 ms from /proc. Before a and c the corpus files are dropped from
the page cache (posix_fadvise), so the first reads come from the disk; small corpora then sit in the
page cache, as they would in practice.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.child import add_child_option, proc_status_kib, run_child, serve_child
from bench.common import RESULTS

METHODS = {
    "a": "Dataset, decode per item",
    "b": "CacheDataset (RAM cache)",
    "c": "preprocess + MemmapCropDataset",
}


# -- synthetic corpus -----------------------------------------------------------------------------
def synthetic_ct(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """int16 HU volume: noisy air (<= -1000) around an elliptical body with fat, lungs and a spine."""
    rng = np.random.default_rng(seed)
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    xx, yy = np.meshgrid(x, y, indexing="ij")
    ax, ay = rng.uniform(0.70, 0.85), rng.uniform(0.50, 0.65)  # body half-axes (fraction of the field of view)
    cx, cy = rng.uniform(-0.05, 0.05), rng.uniform(-0.1, 0.0)
    r_body = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
    plane = np.where(r_body <= 1.0, 40.0, -1000.0).astype(np.float32)
    plane[(r_body > 0.85) & (r_body <= 1.0)] = -100.0  # subcutaneous fat
    plane[((xx - cx) / 0.08) ** 2 + ((yy - cy - 0.6 * ay) / 0.1) ** 2 <= 1.0] = 700.0  # spine
    vol = np.repeat(plane[:, :, None], shape[2], axis=2)
    lungs = (z > 0.1)[None, None, :]  # upper part of the field of view
    for side in (-1, 1):
        lung = (((xx - cx - side * 0.35 * ax) / (0.28 * ax)) ** 2 + ((yy - cy + 0.05) / (0.6 * ay)) ** 2) <= 1.0
        vol[lung[:, :, None] & lungs] = -850.0
    noise = rng.normal(0.0, 20.0, size=shape).astype(np.float32)
    body = vol > -1000.0
    vol = np.where(body, vol + noise, -1000.0 - np.abs(noise))
    return np.clip(vol, -1024, 3071).astype(np.int16)


def make_corpus(folder: Path, n: int, shape: tuple[int, int, int]) -> list[Path]:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    paths = []
    for i in range(n):
        path = folder / f"ct{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(synthetic_ct(shape, seed=i), affine), str(path))
        paths.append(path)
    return paths


def drop_from_page_cache(paths: list[str]) -> None:
    """Write back and drop these files' cached pages, so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- memory ---------------------------------------------------------------------------------------
def _pss_kib(pid: int) -> tuple[int, int]:
    pss = anon = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Pss_Anon:"):
                    anon = int(line.split()[1])
    except OSError:
        pass
    return pss, anon


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", encoding="utf-8") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:
        pass
    return kids


class MemorySampler(threading.Thread):
    """Peaks of this process and its children: per-process VmHWM, and summed PSS (total, anonymous)."""

    def __init__(self, period_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.period_s, self.pid = period_s, os.getpid()
        self.hwm_kib: dict[int, int] = {}
        self.peak_pss_kib = self.peak_anon_kib = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        pss = anon = 0
        for pid in [self.pid] + _children(self.pid):
            self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), proc_status_kib("VmHWM", pid))
            p, a = _pss_kib(pid)
            pss, anon = pss + p, anon + a
        self.peak_pss_kib, self.peak_anon_kib = max(self.peak_pss_kib, pss), max(self.peak_anon_kib, anon)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            time.sleep(self.period_s)

    def stop(self) -> dict:
        self._stop_event.set()
        self.join()
        self.sample()
        workers = [kib for pid, kib in self.hwm_kib.items() if pid != self.pid]
        return {
            "rss_peak_main_mib": round(self.hwm_kib[self.pid] / 1024, 1),
            "rss_peak_workers_mib": round(sum(workers) / 1024, 1),
            "rss_peak_sum_mib": round(sum(self.hwm_kib.values()) / 1024, 1),
            "pss_peak_mib": round(self.peak_pss_kib / 1024, 1),
            "pss_anon_peak_mib": round(self.peak_anon_kib / 1024, 1),
            "processes": len(self.hwm_kib),
        }


# -- one measurement (runs in its own process) ----------------------------------------------------
def _monai_chain(roi: list[int], num_samples: int):
    from monai.transforms import (
        Compose,
        CropForegroundd,
        LoadImaged,
        Orientationd,
        RandSpatialCropSamplesd,
        ScaleIntensityRanged,
        SpatialPadd,
    )

    return Compose(
        [
            LoadImaged(keys="image", image_only=True, ensure_channel_first=True),
            Orientationd(keys="image", axcodes="RAS", labels=None),
            ScaleIntensityRanged(keys="image", a_min=-1000.0, a_max=1000.0, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(keys="image", source_key="image"),
            SpatialPadd(keys="image", spatial_size=roi),
            RandSpatialCropSamplesd(keys="image", roi_size=roi, num_samples=num_samples, random_size=False),
        ]
    )


def measure(spec: dict) -> dict:
    """Crops/s and RAM of one data path; ``spec`` holds method, files, sizes, counts."""
    import torch
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.utils import set_determinism

    from custom.data.ssl_dataset import MemmapCropDataset
    from custom.data.ssl_preprocess import preprocess_corpus

    sampler = MemorySampler()
    sampler.start()
    roi, method = spec["roi"], spec["method"]
    t0 = time.perf_counter()
    if method == "preprocess":
        preprocess_corpus(spec["datalist"], spec["dataset_dir"], spec["corpus_dir"], roi_size=roi)
        setup_s = time.perf_counter() - t0
        files = sorted(str(p) for p in Path(spec["corpus_dir"], "volumes").glob("*.npy"))
        return {
            "setup_s": round(setup_s, 2),
            "corpus_bytes": sum(os.path.getsize(f) for f in files),
            **sampler.stop(),
        }
    set_determinism(seed=0)
    data = [{"image": p} for p in spec["images"]]
    if method == "a":
        ds, cold = Dataset(data, transform=_monai_chain(roi, spec["num_samples"])), spec["images"]
    elif method == "b":
        chain = _monai_chain(roi, spec["num_samples"])
        ds = CacheDataset(data, transform=chain, cache_rate=1.0, num_workers=spec["num_workers"], progress=False)
        cold = []
    elif method == "c":
        ds = MemmapCropDataset(Path(spec["corpus_dir"]) / "index.json", roi_size=roi, num_samples=spec["num_samples"])
        cold = sorted(str(p) for p in Path(spec["corpus_dir"], "volumes").glob("*.npy"))
    else:
        raise ValueError(f"unknown method {method!r}")
    setup_s = time.perf_counter() - t0
    drop_from_page_cache(cold)
    n_items = (spec["batches"] + 1) * spec["batch_size"]
    draw = torch.utils.data.RandomSampler(
        ds, replacement=True, num_samples=n_items, generator=torch.Generator().manual_seed(0)
    )
    loader = DataLoader(ds, batch_size=spec["batch_size"], sampler=draw, num_workers=spec["num_workers"])
    batches = iter(loader)
    next(batches)  # the warm-up batch: workers started, first volumes read
    crops, start = 0, time.perf_counter()
    for _ in range(spec["batches"]):
        image = next(batches)["image"]
        assert tuple(image.shape[1:]) == (1, *roi), image.shape
        crops += image.shape[0]
    elapsed = time.perf_counter() - start
    memory = sampler.stop()  # the workers are still alive: their final VmHWM is read
    del batches
    return {
        "setup_s": round(setup_s, 2),
        "crops": crops,
        "seconds": round(elapsed, 2),
        "crops_per_s": round(crops / elapsed, 2),
        **memory,
    }


# -- report ---------------------------------------------------------------------------------------
def _machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo", encoding="utf-8")
            if line.startswith("model name")
        ),
        "",
    )
    mem = _status_like("/proc/meminfo", "MemTotal")
    import monai
    import torch

    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total_gib": round(mem / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "loadavg_start": os.getloadavg(),
    }


def _status_like(path: str, field: str) -> int:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def table(results: dict) -> str:
    lines = [
        "| corpus | method | setup s | crops/s | peak RSS sum MiB (main + workers) | peak PSS MiB | of it anon MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, runs in results["corpora"].items():
        pre = runs["preprocess"]
        for m in "abc":
            r = runs[m]
            setup = f"{r['setup_s']:.1f}" + (f" + {pre['setup_s']:.1f} preprocess" if m == "c" else "")
            lines.append(
                f"| {size} vols | {m}. {METHODS[m]} | {setup} | {r['crops_per_s']:.1f} | {r['rss_peak_sum_mib']:.0f} "
                f"({r['rss_peak_main_mib']:.0f} + {r['rss_peak_workers_mib']:.0f}) | {r['pss_peak_mib']:.0f} | "
                f"{r['pss_anon_peak_mib']:.0f} |"
            )
    lines += [
        "",
        "| corpus | crops/s c/a | crops/s c/b | RSS sum c/a | RSS sum c/b | PSS c/a | PSS c/b | corpus on disk (c) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, r in results["ratios"].items():
        mib = results["corpora"][size]["preprocess"]["corpus_bytes"] / 2**20
        lines.append(
            f"| {size} vols | {r['crops_per_s_c_over_a']:.1f} | {r['crops_per_s_c_over_b']:.2f} | "
            f"{r['rss_c_over_a']:.2f} | {r['rss_c_over_b']:.2f} | {r['pss_c_over_a']:.2f} | {r['pss_c_over_b']:.2f} | "
            f"{mib:.1f} MiB uint8 |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[4, 32], help="corpus sizes (volumes)")
    parser.add_argument("--shape", nargs=3, type=int, default=[192, 192, 128], help="synthetic volume size")
    parser.add_argument("--roi", nargs=3, type=int, default=[96, 96, 96], help="crop size")
    parser.add_argument("--num_samples", type=int, default=2, help="crops per volume")
    parser.add_argument("--batch_size", type=int, default=2, help="volumes per batch")
    parser.add_argument("--batches", type=int, default=50, help="timed batches (after one warm-up batch)")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (and cache threads)")
    parser.add_argument("--work_dir", default=None, help="where the corpora go (default: a temporary folder)")
    parser.add_argument("--out", default=str(RESULTS / f"ssl_data_{dt.date.today()}.json"))
    add_child_option(parser)
    args = parser.parse_args(argv)
    if args.child:
        return serve_child(args.child, measure)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ssl_data_bench_"))
    try:
        results = {
            "script": "bench.ssl_data_bench",
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": _machine(),
            "setup": {k: v for k, v in vars(args).items() if k not in ("child", "out", "work_dir")},
            "volume": f"int16 .nii.gz {'x'.join(map(str, args.shape))} voxels, 1.5 x 1.5 x 2 mm, synthetic body",
            "corpora": {},
            "ratios": {},
        }
        t0 = time.perf_counter()
        images = make_corpus(work / "nifti", max(args.sizes), tuple(args.shape))
        nifti_bytes = sum(p.stat().st_size for p in images)
        results["generate_s"] = round(time.perf_counter() - t0, 1)
        results["nifti_mib_per_volume"] = round(nifti_bytes / len(images) / 2**20, 2)
        print(
            f"generated {len(images)} volumes ({results['volume']}, {results['nifti_mib_per_volume']} MiB each) "
            f"in {results['generate_s']} s",
            flush=True,
        )
        for size in args.sizes:
            sub = [str(p) for p in images[:size]]
            datalist = work / f"datalist_{size}.json"
            datalist.write_text(json.dumps({"training": sub}), encoding="utf-8")
            spec = {
                "images": sub,
                "datalist": str(datalist),
                "dataset_dir": str(work),
                "corpus_dir": str(work / f"corpus_{size}"),
                "roi": args.roi,
                "num_samples": args.num_samples,
                "batch_size": args.batch_size,
                "batches": args.batches,
                "num_workers": args.num_workers,
            }
            runs = {
                "preprocess": run_child("bench.ssl_data_bench", {**spec, "method": "preprocess"}, check=True).result
            }
            print(f"{size} vols: preprocess {runs['preprocess']}", flush=True)
            for m in "abc":
                runs[m] = run_child("bench.ssl_data_bench", {**spec, "method": m}, check=True).result
                print(f"{size} vols: {m}. {METHODS[m]}: {runs[m]}", flush=True)
            results["corpora"][str(size)] = runs
            a, b, c = runs["a"], runs["b"], runs["c"]
            results["ratios"][str(size)] = {
                "crops_per_s_c_over_a": round(c["crops_per_s"] / a["crops_per_s"], 2),
                "crops_per_s_c_over_b": round(c["crops_per_s"] / b["crops_per_s"], 2),
                "rss_c_over_a": round(c["rss_peak_sum_mib"] / a["rss_peak_sum_mib"], 3),
                "rss_c_over_b": round(c["rss_peak_sum_mib"] / b["rss_peak_sum_mib"], 3),
                "pss_c_over_a": round(c["pss_peak_mib"] / a["pss_peak_mib"], 3),
                "pss_c_over_b": round(c["pss_peak_mib"] / b["pss_peak_mib"], 3),
            }
        results["machine"]["loadavg_end"] = os.getloadavg()
        results["total_s"] = round(time.perf_counter() - t0, 1)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    m = results["machine"]
    print(
        f"\n{results['volume']}; {args.num_samples} crops of {'x'.join(map(str, args.roi))} per volume, "
        f"{args.batch_size} volumes per batch, {args.batches} timed batches, num_workers {args.num_workers}; "
        f"{m['cpus_usable']} x {m['cpu']}, load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}\n"
    )
    print(table(results))
    print(f"\nwrote {out} (total {results['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
