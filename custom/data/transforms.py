"""Transforms MONAI lacks or gets wrong for these bundles.

:class:`Spacingd` works around MONAI 1.6.1's ``monai.transforms.Spacingd``, which, after resampling
a NIfTI image stored under ``key``, calls ``.update(...)`` on *every* other entry whose name starts
with ``f"{key}_"``. MONAI Label puts the string ``image_path`` into the data dict, so the stock
transform dies with ``AttributeError: 'str' object has no attribute 'update'`` on every request. Our
subclass lets only dict-valued ``{key}_*`` entries (the legacy meta dicts the update is meant for)
take part, and is otherwise MONAI's transform, inverse included.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import Spacingd as _MonaiSpacingd

__all__ = ["Spacingd"]


class Spacingd(_MonaiSpacingd):
    """``monai.transforms.Spacingd`` that tolerates non-dict ``{key}_*`` entries (e.g. ``image_path``).

    Example:
        >>> import torch
        >>> from monai.data import MetaTensor
        >>> d = {"image": MetaTensor(torch.zeros(1, 4, 4, 4)), "image_path": "/data/ct.nii.gz"}
        >>> out = Spacingd(keys="image", pixdim=(2.0, 2.0, 2.0))(d)
        >>> out["image_path"], tuple(out["image"].shape)
        ('/data/ct.nii.gz', (1, 2, 2, 2))
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        hidden = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str)
            and not isinstance(d[k], Mapping)
            and any(k.startswith(f"{key}_") for key in self.keys)
        }
        out = super().__call__(d, lazy=lazy)
        out.update(hidden)
        return out
