"""Loading encoder weights in the layout of the paper's released model_swinvit.pt."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import BTCV
from monai.bundle import ConfigParser
from monai.networks.nets import SwinUNETR

from custom.networks.options import LegacyPatchMerging
from custom.networks.ssl import SSLHead, ssl_state_to_released
from custom.networks.weights import PretrainedWeightsError, load_swinvit_weights, validate_optional_path

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
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, downsample=LegacyPatchMerging)
    decoder_before = net.out.conv.conv.weight.clone()
    with caplog.at_level(logging.INFO, logger="custom.networks.weights"):
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


def train_parser(pretrained_path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BTCV / "configs" / "train.json"))
    parser.update(
        {
            "feature_size": 12,
            "use_checkpoint": False,
            "pretrained_path": str(pretrained_path),
            "device": "$torch.device('cpu')",
            **overrides,
        }
    )
    return parser


def merging_classes(net) -> set[str]:
    return {type(m).__name__ for m in net.modules() if "Merging" in type(m).__name__}


def test_train_config_network_loads_pretrained_path(tmp_path):
    """The BTCV train config's `network` id goes through the strict loader."""
    state = make_released_file(tmp_path / "model_swinvit.pt")
    parser = train_parser(tmp_path / "model_swinvit.pt")
    net = parser.get_parsed_content("network")
    assert torch.equal(
        net.swinViT.layers1[0].blocks[0].attn.qkv.weight, state["module.layers1.0.blocks.0.attn.qkv.weight"]
    )
    parser.update({"pretrained_path": str(tmp_path / "absent.pt")})
    with pytest.raises(Exception) as err:  # MONAI wraps it: "Failed to instantiate component ..."
        parser.get_parsed_content("network", lazy=False)
    assert isinstance(err.value.__cause__, FileNotFoundError) and "absent.pt" in str(err.value.__cause__)


# -- the merging order travels with the weights ------------------------------------------------------


def test_released_file_without_record_builds_the_old_merging_order_and_says_so(tmp_path, caplog):
    """The paper's release (released layout, no record) was trained with MONAI < 1.5's order: chosen, logged."""
    make_released_file(tmp_path / "model_swinvit.pt")
    with caplog.at_level(logging.INFO, logger="custom.networks.weights"):
        net = train_parser(tmp_path / "model_swinvit.pt").get_parsed_content("network")  # legacy_merging: null
    assert merging_classes(net) == {"LegacyPatchMerging"}
    assert "the paper's release" in caplog.text and "legacy_merging True" in caplog.text
    assert "matched 126 of 126" in caplog.text


@pytest.mark.parametrize("legacy", [False, True])
def test_file_written_by_this_collection_builds_its_recorded_order(tmp_path, legacy):
    """The SSL bundle's export records the order its encoder was trained with; fine-tuning follows it."""
    path = tmp_path / "model_swinvit.pt"
    torch.save(ssl_state_to_released(SSLHead(feature_size=12).state_dict(), legacy_merging=legacy), path)
    net = train_parser(path).get_parsed_content("network")
    assert merging_classes(net) == {"LegacyPatchMerging" if legacy else "PatchMerging"}


def test_explicit_merging_order_contradicting_the_file_is_refused_unless_accepted(tmp_path, caplog):
    make_released_file(tmp_path / "model_swinvit.pt")
    with pytest.raises(Exception) as err:
        train_parser(tmp_path / "model_swinvit.pt", legacy_merging=False).get_parsed_content("network", lazy=False)
    message = str(err.value.__cause__)
    assert "legacy_merging=False" in message and "MONAI < 1.5's order" in message and "--legacy_merging None" in message
    with caplog.at_level(logging.WARNING, logger="custom.networks.weights"):
        parser = train_parser(tmp_path / "model_swinvit.pt", legacy_merging=False, accept_recipe_mismatch=True)
        net = parser.get_parsed_content("network")
    assert merging_classes(net) == {"PatchMerging"} and "--accept_recipe_mismatch True" in caplog.text


def test_loader_refuses_a_network_built_in_the_other_order(tmp_path):
    """Even outside the configs: the released file does not load silently into MONAI's new order."""
    make_released_file(tmp_path / "model_swinvit.pt")
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)  # MONAI's "merging"
    before = net.swinViT.patch_embed.proj.weight.clone()
    with pytest.raises(PretrainedWeightsError, match="legacy_merging=True"):
        load_swinvit_weights(net, tmp_path / "model_swinvit.pt")
    assert torch.equal(net.swinViT.patch_embed.proj.weight, before)
    report = load_swinvit_weights(net, tmp_path / "model_swinvit.pt", accept_mismatch=True)
    assert len(report.matched) == 126


def test_recorded_export_still_reads_as_the_released_layout(tmp_path):
    """The record is plain data beside "state_dict": weights_only loading and MONAI's load_from still work."""
    path = tmp_path / "model_swinvit.pt"
    torch.save(ssl_state_to_released(SSLHead(feature_size=12).state_dict()), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["recipe"] == {"format": 2, "network": {"legacy_merging": False}}
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    net.load_from(loaded)
    assert torch.equal(
        net.swinViT.layers1[0].blocks[0].attn.qkv.weight,
        loaded["state_dict"]["module.layers1.0.blocks.0.attn.qkv.weight"],
    )
