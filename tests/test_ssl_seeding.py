"""Multi-GPU seeding: every rank draws its own random numbers, reproducibly (2 gloo processes on the CPU).

Each process reads a bundle's ``train.json`` + ``multi_gpu_train.json`` as torchrun would run them, runs
their ``initialize``, and draws what training draws first: for the SSL bundle a batch of crops from the
real ``train#dataloader`` (one volume: both ranks crop the same one) and the real ``train#views``; for
BTCV and MSD the global generators that their transforms and loader workers are seeded from.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.multiprocessing as mp
from helpers import BTCV, MSD, SSL

SEED = 3


def _parsed(bundle, overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "multi_gpu_train.json")])
    parser.update({"bundle_root": str(bundle), "seed": SEED, **overrides})
    parser.get_parsed_content("initialize")
    return parser


def _rank_draws(rank: int, world: int, init_file: str, index_file: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ssl = {
        "index_file": index_file,
        "roi_size": [32, 32, 32],
        "batch_size": 1,
        "num_samples": 2,
        "num_workers": 1,  # a loader worker process: its seed comes from this rank's generator
    }
    out = {}
    for attempt in range(2):  # the same seed twice in one process: the same draws
        parser = _parsed(SSL, ssl)
        loader, views = parser.get_parsed_content("train#dataloader"), parser.get_parsed_content("train#views")
        crops = next(iter(loader))["image"]
        v = views(crops)
        draws = {
            "crops": crops.as_tensor() if hasattr(crops, "as_tensor") else crops,
            "rotation": torch.cat([v["rotation1"], v["rotation2"]]),
            "mask": torch.cat([v["mask1"], v["mask2"]]),
        }
        for name, bundle in (("btcv", BTCV), ("msd", MSD)):
            _parsed(bundle, {})
            draws[name] = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
        out[attempt] = draws
    results[rank] = out
    dist.destroy_process_group()


def _corpus(tmp_path) -> str:
    import nibabel as nib

    from custom.data.ssl_preprocess import preprocess_corpus

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    ct = rng.uniform(-1000, 1000, (48, 48, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), tmp_path / "img" / "ct.nii.gz")
    datalist = tmp_path / "ssl.json"
    datalist.write_text('{"training": [{"image": "img/ct.nii.gz"}]}', encoding="utf-8")  # draws training crops only
    return str(preprocess_corpus(datalist, tmp_path, tmp_path / "corpus", roi_size=(32, 32, 32)))


def test_each_rank_draws_its_own_crops_rotations_and_masks_reproducibly(tmp_path):
    world = 2
    results = mp.Manager().dict()
    mp.spawn(_rank_draws, args=(world, str(tmp_path / "init"), _corpus(tmp_path), results), nprocs=world, join=True)
    r0, r1 = results[0], results[1]
    # the same seed reproduces each rank's draws
    for rank in (r0, r1):
        for key in ("crops", "rotation", "mask"):
            assert torch.equal(rank[0][key], rank[1][key]), key
        for bundle in ("btcv", "msd"):
            t, n, p = rank[0][bundle]
            assert (
                torch.equal(t, rank[1][bundle][0]) and np.array_equal(n, rank[1][bundle][1]) and p == rank[1][bundle][2]
            )
    # ... and the two ranks draw differently (one volume: with one seed on both they crop it identically)
    a, b = r0[0], r1[0]
    assert not torch.equal(a["crops"], b["crops"])
    assert not torch.equal(a["rotation"], b["rotation"]) and not torch.equal(a["mask"], b["mask"])
    for bundle in ("btcv", "msd"):
        assert not torch.equal(a[bundle][0], b[bundle][0])
        assert not np.array_equal(a[bundle][1], b[bundle][1]) and a[bundle][2] != b[bundle][2]
