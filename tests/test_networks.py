"""The legacy patch-merging order for the paper's released weights."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging

from custom.networks import LegacyPatchMerging, downsample_option


def _reference_legacy(m: LegacyPatchMerging, x: torch.Tensor) -> torch.Tensor:
    """The pre-1.5 order written out by hand: x0..x7 with x5, x6 repeating x2, x3."""
    x0 = x[:, 0::2, 0::2, 0::2, :]
    x1 = x[:, 1::2, 0::2, 0::2, :]
    x2 = x[:, 0::2, 1::2, 0::2, :]
    x3 = x[:, 0::2, 0::2, 1::2, :]
    x4 = x[:, 1::2, 0::2, 1::2, :]
    x5 = x[:, 0::2, 1::2, 0::2, :]
    x6 = x[:, 0::2, 0::2, 1::2, :]
    x7 = x[:, 1::2, 1::2, 1::2, :]
    return m.reduction(m.norm(torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)))


@pytest.mark.parametrize("shape", [(2, 4, 6, 8, 3), (1, 2, 2, 2, 5)])
def test_legacy_order_arithmetic(shape):
    torch.manual_seed(0)
    m = LegacyPatchMerging(dim=shape[-1]).eval()
    x = torch.randn(shape)
    out = m(x)
    assert out.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3] // 2, 2 * shape[-1])
    assert torch.allclose(out, _reference_legacy(m, x), atol=1e-6)


def test_concatenated_features_are_the_legacy_offsets():
    """With an identity norm and reduction, each output feature shows which sub-sample it came from."""
    m = LegacyPatchMerging(dim=1)
    m.norm = torch.nn.Identity()
    m.reduction = torch.nn.Identity()
    d, h, w = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(2), indexing="ij")
    code = (d * 100 + h * 10 + w).float()  # voxel (d,h,w) holds the number dhw
    out = m(code[None, ..., None])
    assert out.flatten().tolist() == [0, 100, 10, 1, 101, 10, 1, 111]


def test_legacy_differs_from_monai_merging_with_same_weights():
    torch.manual_seed(0)
    new, old = PatchMerging(dim=4), LegacyPatchMerging(dim=4)
    old.load_state_dict(new.state_dict())  # same parameter names and shapes
    x = torch.randn(1, 4, 4, 4, 4)
    assert not torch.allclose(new(x), old(x))


def test_swinunetr_accepts_the_option():
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, downsample=downsample_option(True))
    assert isinstance(net.swinViT.layers1[0].downsample, LegacyPatchMerging)
    assert net(torch.zeros(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)
    assert downsample_option(False) == "merging"
    with pytest.raises(TypeError, match="True or False"):
        downsample_option("false")
