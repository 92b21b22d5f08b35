"""Network options MONAI's ``SwinUNETR`` lacks.

MONAI 1.5 (PR #8285) changed the order in which the ``"merging"`` patch-merging layer concatenates
the eight 2x2x2 sub-samples of its input, and removed two duplicated offsets. The paper's released
encoder weights (``model_swinvit.pt``) were trained with the old order, whose linear ``reduction``
layer therefore expects different features at each of the 8 * C input positions. Fine-tuning from
those weights with the new order starts from a scrambled downsampling. :class:`LegacyPatchMerging`
restores the old order; pass it as ``SwinUNETR(downsample=LegacyPatchMerging)`` (the bundles expose
it as ``legacy_merging``). For weights produced by this collection's own SSL bundle, keep MONAI's
default.
"""

from __future__ import annotations

import torch
from monai.networks.nets.swin_unetr import PatchMergingV2

__all__ = ["LEGACY_MERGING_OFFSETS", "LegacyPatchMerging", "downsample_option"]

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
    if not isinstance(legacy_merging, bool):
        raise TypeError(
            f"legacy_merging must be True or False, got {legacy_merging!r} ({type(legacy_merging).__name__})."
        )
    return LegacyPatchMerging if legacy_merging else "merging"
