"""The SSL bundle through `python -m monai.bundle run ...` on the real CT sample, and its hand-over to BTCV."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import BTCV, SMALL_SSL, SSL, TORCHRUN, run_bundle, ssl_overrides
from monai.bundle import ConfigParser

from custom.networks.ssl import SSLHead, released_to_ssl_state


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, sample_dataset) -> dict:
    work = tmp_path_factory.mktemp("ssl_run")
    overrides = ssl_overrides(sample_dataset, work, max_epochs=2, epoch_length=1)
    proc = run_bundle("training", ["configs/train.json"], overrides, cwd=SSL)
    return {"work": work, "overrides": overrides, "proc": proc}


def test_pretraining_logs_each_loss_and_writes_checkpoint_and_encoder(pretrained):
    out = pretrained["proc"].stdout
    for term in ("loss_rotation", "loss_contrastive", "loss_reconstruction", "val_reconstruction_l1"):
        assert term in out
    models = pretrained["work"] / "models"
    state = torch.load(models / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 and {"model", "optimizer", "lr_scheduler", "validator"} <= set(state)
    released = torch.load(models / "model_swinvit.pt", weights_only=True)
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in released["state_dict"]
    model = SSLHead(feature_size=12)
    model.load_state_dict(released_to_ssl_state(released))  # our own export loads back, strictly
    cache = pretrained["work"] / "cache"
    index = json.loads((cache / "index.json").read_text(encoding="utf-8"))  # the corpus was preprocessed into the cache
    assert index["complete"] is True and index["settings"]["roi_size"] == SMALL_SSL["roi_size"]
    stored = [(v["section"], Path(v["source"]).name) for v in index["volumes"]]
    assert stored == [("training", "ct_full.nii.gz"), ("validation", "img0001.nii.gz")]  # ssl_dataset.json's
    assert all((cache / v["file"]).is_file() for v in index["volumes"])


def test_resume_continues_pretraining(pretrained, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(pretrained["work"] / "models", models)
    proc = run_bundle(
        "training",
        ["configs/train.json"],
        {**pretrained["overrides"], "ckpt_dir": str(models), "output_dir": str(tmp_path / "out"), "max_epochs": 3},
        cwd=SSL,
    )
    assert "resumed from" in proc.stdout and "epoch 2, iteration 2" in proc.stdout
    state = torch.load(models / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 3 and state["lr_scheduler"]["last_epoch"] == 3


def test_encoder_hands_over_to_btcv_with_every_tensor_matched(pretrained, caplog):
    encoder = pretrained["work"] / "models" / "model_swinvit.pt"
    parser = ConfigParser()
    parser.read_config(str(BTCV / "configs" / "train.json"))
    parser.update(
        {"feature_size": 12, "use_checkpoint": False, "pretrained_path": str(encoder), "device": "$torch.device('cpu')"}
    )
    with caplog.at_level("INFO", logger="custom.networks.weights"):
        net = parser.get_parsed_content("network")
    assert "matched 126 of 126 encoder tensors" in caplog.text
    ssl = released_to_ssl_state(torch.load(encoder, weights_only=True))
    assert torch.equal(
        net.swinViT.layers2[0].blocks[0].attn.qkv.weight, ssl["swinViT.layers2.0.blocks.0.attn.qkv.weight"]
    )


def test_check_data_names_a_missing_volume(tmp_path, sample_dataset):
    datalist = tmp_path / "ssl.json"
    datalist.write_text(
        json.dumps({"training": [{"image": "imagesTs/ct_full.nii.gz"}, {"image": "imagesTs/gone.nii.gz"}]}),
        encoding="utf-8",
    )
    proc = run_bundle(
        "check_data",
        ["configs/train.json"],
        {"dataset_dir": str(sample_dataset), "datalist": [str(datalist)]},
        cwd=SSL,
        check=False,
    )
    assert proc.returncode != 0 and "gone.nii.gz: image file not found" in proc.stdout + proc.stderr


def test_multi_gpu_pretraining_on_two_cpu_processes(tmp_path, sample_dataset):
    """torchrun, 2 ranks on gloo: rank 0 preprocesses, each rank seeds itself, negatives are gathered, only rank 0 writes."""
    overrides = ssl_overrides(sample_dataset, tmp_path, max_epochs=1, epoch_length=1)
    proc = run_bundle(
        "training", ["configs/train.json", "configs/multi_gpu_train.json"], overrides, cwd=SSL, python_args=TORCHRUN
    )
    out = proc.stdout + proc.stderr
    assert "rank 0: random seed 0 (base seed 0 + rank)" in out and "rank 1: random seed 1 (base seed 0 + rank)" in out
    state = torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 1
    assert not any(k.startswith("module.") for k in state["model"])
    assert (tmp_path / "models" / "model_swinvit.pt").is_file()


def test_inference_reconstructs_a_whole_volume_on_its_own_grid(tmp_path, sample_dir):
    """configs/inference.json with a tiny untrained model: the reconstruction of the real CT slab, as NIfTI."""
    import nibabel as nib
    import numpy as np

    from custom.networks.ssl import ssl_state_to_released

    models, inp = tmp_path / "models", tmp_path / "in"
    models.mkdir()
    inp.mkdir()
    torch.manual_seed(0)
    torch.save(ssl_state_to_released(SSLHead(feature_size=12).state_dict()), models / "model_swinvit.pt")
    shutil.copy(sample_dir / "ct_slab.nii.gz", inp / "slab.nii.gz")
    overrides = {
        "feature_size": 12,
        "roi_size": [64, 64, 64],
        "amp": False,
        "num_workers": 0,
        "sw_batch_size": 4,
        "overlap": 0.0,
        "ckpt_dir": str(models),
        "input_dir": str(inp),
        "output_dir": str(tmp_path / "out"),
    }
    run_bundle("inference", ["configs/inference.json"], overrides, cwd=SSL)
    recon, image = nib.load(tmp_path / "out" / "slab_recon.nii.gz"), nib.load(inp / "slab.nii.gz")
    assert recon.shape == image.shape == (122, 101, 30)
    assert np.allclose(recon.affine, image.affine, atol=1e-4)
    values = np.asarray(recon.dataobj)
    assert recon.get_data_dtype() == np.float32 and np.isfinite(values).all() and values.std() > 0
