"""Loading encoder weights in the layout of the paper's released model_swinvit.pt."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import BTCV
from monai.bundle import ConfigParser
from monai.networks.nets import SwinUNETR

from custom.weights import PretrainedWeightsError, load_swinvit_weights, validate_optional_path

BLOCK_TENSORS = [
    "norm1.weight",
    "norm1.bias",
    "attn.relative_position_bias_table",
    "attn.relative_position_index",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
]
EXTRAS = [
    "module.norm.weight",
    "module.norm.bias",
    "module.rotation_head.weight",
    "module.rotation_head.bias",
    "module.contrastive_head.weight",
    "module.contrastive_head.bias",
    "module.conv.0.weight",
]


def released_layout_keys() -> list[str]:
    """The 126 encoder keys of the released file, spelled out from its documented layout."""
    keys = ["module.patch_embed.proj.weight", "module.patch_embed.proj.bias"]
    for layer in range(1, 5):
        for block in range(2):
            keys += [f"module.layers{layer}.0.blocks.{block}.{t}" for t in BLOCK_TENSORS]
        keys += [f"module.layers{layer}.0.downsample.{t}" for t in ("reduction.weight", "norm.weight", "norm.bias")]
    return keys


def make_released_file(path, feature_size=12, drop=()):
    """Write ``{"state_dict": ...}`` with released key names, random values of the right shapes, plus extras."""
    ref = SwinUNETR(in_channels=1, out_channels=14, feature_size=feature_size).swinViT.state_dict()
    torch.manual_seed(1)
    state = {}
    for key in released_layout_keys():
        monai_name = key[len("module.") :].replace("mlp.fc1", "mlp.linear1").replace("mlp.fc2", "mlp.linear2")
        t = ref[monai_name]
        state[key] = t.clone() if t.dtype == torch.long else torch.randn_like(t)
    for key in EXTRAS:
        state[key] = torch.randn(4, 8 * feature_size)
    for key in drop:
        del state[key]
    torch.save({"state_dict": state, "epoch": 100}, path)
    return state


def test_layout_has_126_encoder_tensors():
    assert len(released_layout_keys()) == 126


def test_all_encoder_tensors_matched_extras_ignored(tmp_path, caplog):
    state = make_released_file(tmp_path / "model_swinvit.pt")
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    decoder_before = net.out.conv.conv.weight.clone()
    with caplog.at_level(logging.INFO, logger="custom.weights"):
        report = load_swinvit_weights(net, tmp_path / "model_swinvit.pt")
    assert len(report.matched) == 126 and report.expected == 126
    assert sorted(report.ignored) == sorted(EXTRAS)
    assert "matched 126 of 126 encoder tensors; ignored 7" in caplog.text
    loaded = net.swinViT.state_dict()
    assert torch.equal(
        loaded["layers3.0.blocks.1.mlp.linear1.weight"], state["module.layers3.0.blocks.1.mlp.fc1.weight"]
    )
    assert torch.equal(loaded["patch_embed.proj.weight"], state["module.patch_embed.proj.weight"])
    assert torch.equal(net.out.conv.conv.weight, decoder_before)  # decoder untouched


def test_missing_tensor_fails_loudly(tmp_path):
    make_released_file(tmp_path / "w.pt", drop=["module.layers2.0.blocks.1.mlp.fc2.weight"])
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    before = net.swinViT.patch_embed.proj.weight.clone()
    with pytest.raises(
        PretrainedWeightsError, match=r"matched 125 of 126.*layers2\.0\.blocks\.1\.mlp\.linear2\.weight"
    ):
        load_swinvit_weights(net, tmp_path / "w.pt")
    assert torch.equal(net.swinViT.patch_embed.proj.weight, before)  # nothing half-loaded


def test_other_feature_size_fails_with_hint(tmp_path):
    make_released_file(tmp_path / "f24.pt", feature_size=24)
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    with pytest.raises(PretrainedWeightsError, match="another shape.*feature_size"):
        load_swinvit_weights(net, tmp_path / "f24.pt")


def test_research_loader_layout_mistake_matches_nothing(tmp_path):
    """A state_dict with unrelated names (what a wrong prefix strip produces) is refused, not loaded as nothing."""
    torch.save({"state_dict": {"encoder.foo": torch.zeros(1)}}, tmp_path / "x.pt")
    with pytest.raises(PretrainedWeightsError, match="matched 0 of 126"):
        load_swinvit_weights(SwinUNETR(in_channels=1, out_channels=14, feature_size=12), tmp_path / "x.pt")


@pytest.mark.parametrize("value", ["null", "None", "false", ""])
def test_cli_strings_for_none_are_refused(value):
    with pytest.raises(ValueError, match="--pretrained_path None"):
        validate_optional_path(value, "pretrained_path")


def test_missing_file_named():
    with pytest.raises(FileNotFoundError, match="no_such_weights.pt"):
        validate_optional_path("/nowhere/no_such_weights.pt", "pretrained_path")


def test_train_config_network_loads_pretrained_path(tmp_path):
    """The BTCV train config's `network` id goes through the strict loader."""
    state = make_released_file(tmp_path / "model_swinvit.pt")
    parser = ConfigParser()
    parser.read_config(str(BTCV / "configs" / "train.json"))
    parser.update(
        {
            "feature_size": 12,
            "use_checkpoint": False,
            "pretrained_path": str(tmp_path / "model_swinvit.pt"),
            "device": "$torch.device('cpu')",
        }
    )
    net = parser.get_parsed_content("network")
    assert torch.equal(
        net.swinViT.layers1[0].blocks[0].attn.qkv.weight, state["module.layers1.0.blocks.0.attn.qkv.weight"]
    )
    parser.update({"pretrained_path": str(tmp_path / "absent.pt")})
    with pytest.raises(Exception) as err:  # MONAI wraps it: "Failed to instantiate component ..."
        parser.get_parsed_content("network", lazy=False)
    assert isinstance(err.value.__cause__, FileNotFoundError) and "absent.pt" in str(err.value.__cause__)
