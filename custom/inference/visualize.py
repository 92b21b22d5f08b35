"""A quick-look PNG per evaluated case: image | label | prediction on the most informative slice.

MONAI's ``monai.visualize`` draws through matplotlib; a three-panel PNG needs only numpy and Pillow,
so the bundles do not pull in matplotlib for it.
"""

from __future__ import annotations

import colorsys
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["label_palette", "overlay_panels", "save_overlay_png"]


def label_palette(num_classes: int = 256) -> np.ndarray:
    """A fixed RGB colour per label index (0 black), hues spread by golden-ratio steps. ``(num_classes, 3)``."""
    colours = [colorsys.hsv_to_rgb((i * 0.61803398875) % 1.0, 0.85, 1.0) for i in range(num_classes)]
    table = (np.array(colours) * 255).astype(np.uint8)
    table[0] = 0
    return table


def _to_label_map(x: torch.Tensor | np.ndarray, background_channel: bool = True) -> np.ndarray:
    """``(C, X, Y, Z)`` -> label map: argmax of one-hot classes (channel 0 the background), or, for
    overlapping regions without a background channel, the highest region that is on (1..C).
    ``(1, X, Y, Z)`` or ``(X, Y, Z)`` -> as is."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 4 and a.shape[0] > 1:
        if background_channel:
            a = a.argmax(0)
        else:
            a = ((a > 0.5) * np.arange(1, a.shape[0] + 1)[:, None, None, None]).max(0)
    elif a.ndim == 4:
        a = a[0]
    return a.astype(np.int64)


def overlay_panels(
    image: torch.Tensor | np.ndarray, label, pred, alpha: float = 0.45, background_channel: bool = True
) -> np.ndarray:
    """Three RGB panels side by side, ``(Y, 3X, 3)`` uint8, on the axial slice with most label voxels.

    ``image`` is ``(1, X, Y, Z)`` (RAS, intensities scaled to about 0..1); ``label``/``pred`` are label
    maps or one-hot. With no labelled voxel the prediction picks the slice; with neither, the middle.
    """
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    img = img[0] if img.ndim == 4 else img  # first channel of a multi-channel image
    lab, prd = _to_label_map(label, background_channel), _to_label_map(pred, background_channel)
    counts = (lab > 0).sum((0, 1))
    if counts.max() == 0:
        counts = (prd > 0).sum((0, 1))
    z = int(counts.argmax()) if counts.max() > 0 else img.shape[2] // 2

    lo, hi = np.percentile(img[..., z], (0.5, 99.5))
    gray = np.clip((img[..., z] - lo) / max(hi - lo, 1e-6), 0, 1)
    gray_rgb = np.repeat(gray[..., None] * 255, 3, axis=-1)
    palette = label_palette(max(int(lab.max()), int(prd.max()), 1) + 1).astype(np.float64)

    def blend(labels: np.ndarray) -> np.ndarray:
        out = gray_rgb.copy()
        mask = labels > 0
        out[mask] = (1 - alpha) * out[mask] + alpha * palette[labels[mask]]
        return out

    panels = [gray_rgb, blend(lab[..., z]), blend(prd[..., z])]
    # RAS array axes (x: right->left... as stored, y: posterior->anterior): show anterior up, patient right on the left
    panels = [np.flipud(np.transpose(p, (1, 0, 2))) for p in panels]
    return np.concatenate(panels, axis=1).astype(np.uint8)


def save_overlay_png(
    path: str | os.PathLike, image, label, pred, title: str = "", background_channel: bool = True
) -> None:
    """Write :func:`overlay_panels` to ``path`` with column titles ``image | label | prediction``."""
    rgb = overlay_panels(image, label, pred, background_channel=background_channel)
    header = 16
    canvas = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + header))
    canvas.paste(Image.fromarray(rgb), (0, header))
    draw = ImageDraw.Draw(canvas)
    width = rgb.shape[1] // 3
    for i, name in enumerate(("image", "label", "prediction")):
        draw.text((i * width + 4, 2), f"{title} {name}".strip() if i == 0 else name, fill=(255, 255, 255))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
