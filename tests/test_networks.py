"""The legacy patch-merging order for the paper's released weights; the speed options keep the function."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging

from custom.networks.options import LegacyPatchMerging, SDPAWindowAttention, downsample_option, speed_options


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


def test_sdpa_attention_computes_the_same_function_and_gradients():
    # 64^3 at feature_size 12: shifted windows (with the attention mask) and windows cut to the map size
    torch.manual_seed(0)
    ref = SwinUNETR(1, 3, feature_size=12).train()
    fast = speed_options(copy.deepcopy(ref), sdpa_attention=True)
    swapped = [m for m in fast.modules() if isinstance(m, SDPAWindowAttention)]
    assert len(swapped) == 8  # two blocks in each of the four stages
    assert fast.state_dict().keys() == ref.state_dict().keys()  # model.pt files load either way
    x = torch.randn(2, 1, 64, 64, 64)
    y_ref, y_fast = ref(x), fast(x)
    assert torch.allclose(y_fast, y_ref, atol=1e-5)
    y_ref.square().mean().backward()
    y_fast.square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_sdpa_attention_hands_the_gpu_kernels_tensors_they_accept(monkeypatch):
    # PyTorch's fused attention kernels (cuDNN, memory-efficient) refuse a mask whose last stride is not 1
    # and fall back, silently, to the fp32 math kernel: on an H100 that made 5 of the 8 attention layers of
    # Swin UNETR 6x slower (bench/infer_probe.py). Every call, shifted windows or not, must qualify.
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q, k, v, attn_mask))
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    net = speed_options(SwinUNETR(1, 3, feature_size=12), sdpa_attention=True).eval()
    with torch.no_grad():
        net(torch.zeros(1, 1, 64, 64, 64))
    assert len(calls) == 8
    for q, k, v, mask in calls:
        assert mask is not None and mask.stride(-1) == 1, mask.stride()
        assert mask.dim() == 4 and all(m in (1, s) for m, s in zip(mask.shape[:2], q.shape[:2], strict=True))
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1


def test_speed_options_refuse_strings():
    with pytest.raises(TypeError, match="sdpa_attention must be True or False"):
        speed_options(SwinUNETR(1, 2, feature_size=12), sdpa_attention="false")
