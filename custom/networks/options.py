"""Network options MONAI's ``SwinUNETR`` lacks.

MONAI 1.5 (PR #8285) changed the order in which the ``"merging"`` patch-merging layer concatenates
the eight 2x2x2 sub-samples of its input, and removed two duplicated offsets. The paper's released
encoder weights (``model_swinvit.pt``) were trained with the old order, whose linear ``reduction``
layer therefore expects different features at each of the 8 * C input positions. Fine-tuning from
those weights with the new order starts from a scrambled downsampling. :class:`LegacyPatchMerging`
restores the old order; pass it as ``SwinUNETR(downsample=LegacyPatchMerging)`` (the bundles expose
it as ``legacy_merging``). For weights produced by this collection's own SSL bundle, keep MONAI's
default.

:class:`SDPAWindowAttention` and :func:`speed_options` are the speed levers the bundles' configs
switch on (figures in ``docs/benchmarks.md``): MONAI's ``use_flash_attention`` only applies when
autograd is off, so training still materialises every ``(windows x heads x 343 x 343)`` attention
matrix; the SDPA variant keeps the same parameters and computes the same function in training too.
"""

from __future__ import annotations

import torch
from monai.networks.nets.swin_unetr import PatchMergingV2, WindowAttention

from custom.utils import require_bool

__all__ = ["LEGACY_MERGING_OFFSETS", "LegacyPatchMerging", "SDPAWindowAttention", "downsample_option", "speed_options"]

#: (d, h, w) start offsets of the eight strided sub-samples, in the pre-1.5 order. The sixth and
#: seventh repeat the third and fourth: that is what the released weights were trained with.
LEGACY_MERGING_OFFSETS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (1, 0, 0),
    (0, 1, 0),
    (0, 0, 1),
    (1, 0, 1),
    (0, 1, 0),
    (0, 0, 1),
    (1, 1, 1),
)


class LegacyPatchMerging(PatchMergingV2):
    """Swin patch merging with MONAI < 1.5's sub-sample order, for the paper's released weights.

    Input ``(B, D, H, W, C)`` channels-last, output ``(B, ceil(D/2), ceil(H/2), ceil(W/2), 2C)``.
    Parameters (``norm``, ``reduction``) are MONAI's, so state_dict keys are unchanged.

    Example:
        >>> m = LegacyPatchMerging(dim=2)
        >>> m(torch.zeros(1, 4, 4, 4, 2)).shape
        torch.Size([1, 2, 2, 2, 4])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"LegacyPatchMerging expects a (B, D, H, W, C) tensor, got shape {tuple(x.shape)}.")
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = torch.nn.functional.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in LEGACY_MERGING_OFFSETS], dim=-1)
        return self.reduction(self.norm(x))


def downsample_option(legacy_merging: bool) -> str | type[LegacyPatchMerging]:
    """The ``downsample`` argument for ``SwinUNETR``: MONAI's ``"merging"`` or the legacy order.

    Raises:
        TypeError: ``legacy_merging`` is not a bool (``--legacy_merging false`` on the command
            line arrives as the string ``"false"``; write ``False``).
    """
    return LegacyPatchMerging if require_bool(legacy_merging, "legacy_merging") else "merging"


class SDPAWindowAttention(WindowAttention):
    """MONAI's Swin window attention through ``scaled_dot_product_attention``, in training as well.

    Same parameters and state_dict keys as :class:`monai.networks.nets.swin_unetr.WindowAttention`,
    same function (tested against it, outputs and gradients). The windows of each image are folded
    into the head dimension, ``(B * nW, heads, n, d) -> (B, nW * heads, n, d)`` (a view), so the
    additive bias (relative position bias plus the shifted-window mask) is built once per call at
    ``(nW * heads, n, n)`` and broadcast over the batch instead of being expanded per image. On a
    GPU the memory-efficient kernel then never stores the attention matrix, and gets the bias
    gradient without it.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        index = self.relative_position_index.clone()[:n, :n].reshape(-1)  # type: ignore[operator]
        # contiguous: the GPU's fused kernels (cuDNN, memory-efficient) need the mask's last stride to be 1;
        # a permuted view silently sends the call to the fp32 math kernel, 6x slower (docs/benchmarks.md)
        bias = self.relative_position_bias_table[index].reshape(n, n, heads).permute(2, 0, 1).contiguous()
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)).reshape(1, nw * heads, n, n)
            q, k, v = (t.reshape(b // nw, nw * heads, n, -1) for t in (q, k, v))
        else:
            bias = bias.unsqueeze(0)
        x = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )
        x = x.reshape(b, heads, n, -1).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


def speed_options(
    network: torch.nn.Module, sdpa_attention: bool = False, channels_last: bool = False
) -> torch.nn.Module:
    """Switch a Swin UNETR (or any module holding MONAI ``WindowAttention``) to the faster kernels.

    Args:
        network: the network, modified in place and returned (weights untouched).
        sdpa_attention: swap every ``WindowAttention`` for :class:`SDPAWindowAttention`.
        channels_last: store conv weights as ``torch.channels_last_3d``; cuDNN then runs its NDHWC
            kernels, and the Swin stages' own ``(B, D, H, W, C)`` layout needs no transpose copy.

    Example:
        >>> from monai.networks.nets import SwinUNETR
        >>> net = speed_options(SwinUNETR(1, 2, feature_size=12), sdpa_attention=True)
        >>> type(net.swinViT.layers1[0].blocks[0].attn).__name__
        'SDPAWindowAttention'
    """
    require_bool(sdpa_attention, "sdpa_attention")
    require_bool(channels_last, "channels_last")
    if sdpa_attention:
        for module in network.modules():
            if type(module) is WindowAttention:
                # a class swap keeps the module's parameters, buffers, hooks and device as they are
                module.__class__ = SDPAWindowAttention
    if channels_last:
        network.to(memory_format=torch.channels_last_3d)
    return network
