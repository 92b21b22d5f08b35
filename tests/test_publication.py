"""Publication: reproducible archives, an index and downloads through it, running a downloaded bundle, ONNX."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BTCV, REPO, SMALL, cli, custom_of_child, run_bundle

from bundles.package import download_bundle, package_bundle, sha256, write_index


def test_archive_is_reproducible_and_self_contained(tmp_path):
    a = package_bundle(BTCV, tmp_path / "a")
    b = package_bundle(BTCV, tmp_path / "b")
    version = json.loads((BTCV / "configs" / "metadata.json").read_text(encoding="utf-8"))["version"]
    assert a.name == f"swin_unetr_btcv_v{version}.zip" and a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as zf:
        names = zf.namelist()
        infos = zf.infolist()
    assert names == sorted(names)
    assert all(n.startswith("swin_unetr_btcv/") for n in names)
    # the whole of custom/ (through the bundle's link) and every config, each once
    custom = sorted(
        f"swin_unetr_btcv/custom/{p.relative_to(REPO / 'custom').as_posix()}"
        for p in (REPO / "custom").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert [n for n in names if n.startswith("swin_unetr_btcv/custom/")] == custom
    configs = sorted(f"swin_unetr_btcv/configs/{p.name}" for p in (BTCV / "configs").iterdir())
    assert [n for n in names if n.startswith("swin_unetr_btcv/configs/")] == configs
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/models/" in n]
    assert all(
        i.date_time == (1980, 1, 1, 0, 0, 0) and not (i.external_attr >> 16) & 0o170000 == 0o120000 for i in infos
    )


def test_index_and_download_refuse_a_mismatching_archive(tmp_path):
    archive = package_bundle(BTCV, tmp_path / "dist")
    index = write_index([archive], (tmp_path / "dist").as_uri(), tmp_path / "dist" / "model_info.json")
    version = json.loads((BTCV / "configs" / "metadata.json").read_text(encoding="utf-8"))["version"]
    assert index[f"swin_unetr_btcv_v{version}"]["checksum"] == sha256(archive)
    got = download_bundle("swin_unetr_btcv", str(tmp_path / "dist" / "model_info.json"), tmp_path / "ok")
    assert (got / "configs" / "inference.json").is_file() and (got / "custom" / "networks" / "weights.py").is_file()
    archive.write_bytes(archive.read_bytes() + b"tampered")
    with pytest.raises(ValueError, match="checksum differs from the index"):
        download_bundle("swin_unetr_btcv", str(tmp_path / "dist" / "model_info.json"), tmp_path / "bad")
    assert not list((tmp_path / "bad").glob("*"))  # nothing kept, nothing unpacked
    with pytest.raises(KeyError, match="no bundle 'nope'"):
        download_bundle("nope", str(tmp_path / "dist" / "model_info.json"), tmp_path / "bad")


def test_downloaded_bundle_runs_inference_outside_the_repo(trained, tmp_path, sample_dir):
    """Package with a freshly trained model, download with MONAI's own command, segment the real slab."""
    staged = tmp_path / "stage" / "swin_unetr_btcv"
    shutil.copytree(BTCV, staged, ignore=shutil.ignore_patterns("__pycache__", "models", "outputs"))
    (staged / "models").mkdir()
    shutil.copy(Path(trained["ckpt_dir"]) / "model.pt", staged / "models" / "model.pt")
    archive = package_bundle(staged, tmp_path / "dist", include=["models/model.pt"])
    target = tmp_path / "downloaded"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "download",
            "--name",
            "swin_unetr_btcv",
            "--bundle_dir",
            str(target),
            "--url",
            archive.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    bundle = target / "swin_unetr_btcv"
    assert (bundle / "models" / "model.pt").is_file() and not (bundle / "custom").is_symlink()
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(sample_dir / "ct_slab.nii.gz", inp / "slab.nii.gz")
    proc = run_bundle(
        "inference",
        ["configs/inference.json"],
        {**SMALL, "input_dir": str(inp), "output_dir": str(tmp_path / "seg")},
        cwd=bundle,
        report_custom=True,
    )
    assert (tmp_path / "seg" / "slab_seg.nii.gz").is_file()
    own = (bundle / "custom").resolve()  # the archive's custom/, unpacked: not the repository's
    modules = custom_of_child(proc)
    assert {"custom", "custom.data.inputs", "custom.networks.recipe"} <= set(modules), sorted(modules)
    assert all(f.resolve().is_relative_to(own) for f in modules.values()), {n: str(f) for n, f in modules.items()}


def test_onnx_export_matches_eager(trained, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from monai.networks.nets import SwinUNETR

    out = tmp_path / "model.onnx"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "onnx_export",
        "network_def",
        "--filepath",
        str(out),
        "--ckpt_file",
        str(Path(trained["ckpt_dir"]) / "model.pt"),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--input_shape",
        "[1,1,64,64,64]",
        "--use_trace",
        "True",
        "--converter_kwargs",
        "{'dynamo': False, 'opset_version': 17}",
        *cli({"feature_size": 12}),
    ]
    proc = subprocess.run(cmd, cwd=BTCV, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12).eval()
    net.load_state_dict(torch.load(Path(trained["ckpt_dir"]) / "model.pt", weights_only=True)["model"])
    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = net(x).numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    diff = float(np.abs(onnx_out - eager).max())
    print(f"ONNX Runtime vs eager PyTorch, max abs difference: {diff:.2e}")
    assert diff < 1e-3


def test_inference_through_onnx_runtime_matches_pytorch(trained, tmp_path, sample_dir):
    """``--onnx_runtime True``: the bundle's own inference, windows run by ONNX Runtime, same label map."""
    pytest.importorskip("onnxruntime")
    import nibabel as nib

    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(sample_dir / "ct_slab.nii.gz", inp / "slab.nii.gz")
    segs = {}
    for onnx_runtime in (False, True):
        out = tmp_path / f"seg_{onnx_runtime}"
        overrides = {**SMALL, "ckpt_dir": trained["ckpt_dir"], "input_dir": str(inp), "output_dir": str(out)}
        proc = run_bundle("inference", ["configs/inference.json"], {**overrides, "onnx_runtime": onnx_runtime})
        assert ("run by ONNX Runtime" in proc.stdout + proc.stderr) == onnx_runtime
        segs[onnx_runtime] = nib.load(out / "slab_seg.nii.gz")
    eager, ort = (np.asarray(s.dataobj) for s in (segs[False], segs[True]))
    assert eager.shape == ort.shape and np.allclose(segs[False].affine, segs[True].affine)
    assert (eager == ort).mean() >= 0.999, f"only {(eager == ort).mean():.4%} of voxels agree"


def test_onnx_runtime_option_is_checked():
    from monai.networks.nets import SwinUNETR

    from custom.networks.runtimes import OnnxRuntimePredictor, cpu_predictor

    net = SwinUNETR(1, 2, feature_size=12).eval()
    assert cpu_predictor(net, False, (64, 64, 64)) is net
    with pytest.raises(TypeError, match="onnx_runtime must be True or False"):
        cpu_predictor(net, "false", (64, 64, 64))
    predictor = cpu_predictor(net, True, (64, 64, 64))
    assert isinstance(predictor, OnnxRuntimePredictor)
    with pytest.raises(ValueError, match=r"expected windows of \(64, 64, 64\)"):
        predictor(torch.zeros(1, 1, 32, 64, 64))
