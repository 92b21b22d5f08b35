"""A preview PNG a person can read: axial, coronal and sagittal views through the segmented structures.

MONAI's ``monai.visualize`` draws through matplotlib (not installed with the bundles) and has no
three-view layout with a legend; this module draws with numpy and Pillow only:

- the volume is turned to RAS (``nibabel.orientations`` from the affine) and shown in the radiological
  convention: axial from the feet (patient's right on the left, anterior up), coronal from the front
  (patient's right on the left, head up), sagittal from the patient's right (anterior on the left,
  head up);
- each view's slice is the one holding most foreground of the prediction along that axis (with no
  foreground, the middle), so the views cut through the structures, not the image centre;
- pixels are scaled to the voxel spacing (one scale in pixels per mm for all panels), so organs keep
  their physical proportions;
- the label map is blended over the image (alpha 0.4) with each structure's outline in full colour,
  in :func:`custom.inference.visualize.label_palette`'s colours, and a legend names every class
  present in its colour; CT is shown in a soft-tissue window (W 400, L 40 HU), other images between
  their 0.5 and 99.5 percentiles;
- with a reference label (evaluation), a second row shows the label through the same slices and the
  title gives the case's mean Dice (:func:`case_dice`: the scoring rule of ``metrics.json``).

:class:`CasePreview` is the handler the bundles attach to inference: ``<case>_preview.png`` per case.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from custom.inference.case_outputs import CaseOutputHandler, as_labels, label_volume, original_image, slabs, source_of
from custom.inference.statistics import same_grid
from custom.inference.visualize import label_palette
from custom.utils import atomic_write

__all__ = [
    "CT_WINDOW",
    "to_ras",
    "choose_slices",
    "case_dice",
    "render_preview",
    "save_preview",
    "save_evaluation_preview",
    "CasePreview",
]

logger = logging.getLogger(__name__)

#: soft-tissue window for CT (HU), used when the image looks like CT (values below -500)
CT_WINDOW = (-160.0, 240.0)
_ALPHA = 0.4
_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_CAPTION = (255, 225, 90)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _image_volume(x: Any) -> np.ndarray:
    a = _numpy(x)
    a = a[0] if a.ndim == 4 else a  # the first channel of a multi-channel image
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D image (optionally with channels first), got shape {tuple(a.shape)}")
    return a


def _class_counts(volume: np.ndarray, n: int | None = None) -> np.ndarray:
    """Voxels per class of a label map, slab by slab (no whole-volume integer copy)."""
    counts = np.zeros(0, np.int64)
    for part in slabs(volume.shape):
        c = np.bincount(as_labels(volume[..., part]).reshape(-1), minlength=n or 0)
        counts = np.pad(counts, (0, max(0, len(c) - len(counts)))) + np.pad(c, (0, max(0, len(counts) - len(c))))
    return counts


def to_ras(volume: np.ndarray, affine: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(volume in RAS axis order, voxel spacing in mm along those axes)`` for a ``(X, Y, Z)`` array and its affine."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    affine = np.asarray(_numpy(affine), float)
    ornt = io_orientation(affine)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    transform = ornt_transform(ornt, axcodes2ornt("RAS"))
    ras = apply_orientation(volume, transform)
    ras_spacing = np.empty(3)
    for src_axis, (dst_axis, _) in enumerate(transform):
        ras_spacing[int(dst_axis)] = spacing[src_axis]
    return ras, ras_spacing


def choose_slices(label: np.ndarray) -> tuple[int, int, int]:
    """``(x, y, z)``: per axis, the slice with most foreground voxels (``label > 0``); the middle when there is none.

    Slices within 2 % of the most are taken as ties, and the one nearest the middle of them is chosen, so a
    prediction that covers the whole image (an untrained network) is cut through its middle, not its edge.

    >>> choose_slices(np.ones((5, 7, 9), int))
    (2, 3, 4)
    """
    fg = label > 0
    out = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        counts = fg.sum(others)
        if counts.max() == 0:
            out.append(label.shape[axis] // 2)
            continue
        near = np.flatnonzero(counts >= 0.98 * counts.max())
        out.append(int(near[np.argmin(np.abs(near - (near[0] + near[-1]) / 2))]))
    return out[0], out[1], out[2]


def case_dice(pred: Any, label: Any, num_classes: int | None = None) -> float:
    """Mean Dice over the classes (background excluded) in the label or the prediction of one case.

    The rule of ``metrics.json``: a class predicted but absent from the label scores 0; a class absent
    from both is left out; NaN when no class is in either.

    >>> p = np.zeros((2, 2, 2), int); l = p.copy(); p[0] = 1; l[0, 0] = 1; l[1, 1, 1] = 2
    >>> round(case_dice(p, l), 4)
    0.3333
    """
    p, lab = label_volume(pred), label_volume(label)
    if p.shape != lab.shape:
        raise ValueError(f"the prediction's grid {p.shape} differs from the label's {lab.shape}")
    if num_classes is None:
        num_classes = int(max(np.rint(p.max(initial=0)), np.rint(lab.max(initial=0)))) + 1
    n = num_classes
    both = np.zeros(n * n, np.int64)
    for part in slabs(p.shape):
        both += np.bincount((as_labels(p[..., part]) * n + as_labels(lab[..., part])).reshape(-1), minlength=n * n)
    both = both.reshape(n, n)
    inter = np.diag(both)[1:].astype(float)
    sizes = both.sum(1)[1:] + both.sum(0)[1:]
    present = sizes > 0
    return float((2 * inter[present] / sizes[present]).mean()) if present.any() else float("nan")


def _window(image: np.ndarray, window: Sequence[float] | None) -> tuple[float, float]:
    if window is not None:
        return float(window[0]), float(window[1])
    step = max(1, round((image.size / 2_000_000) ** (1 / 3)))
    sample = np.asarray(image[::step, ::step, ::step], np.float32).reshape(-1)  # about 2 M voxels, any layout
    if sample.size and float(sample.min()) < -500:  # Hounsfield units
        return CT_WINDOW
    lo, hi = np.percentile(sample, (0.5, 99.5)) if sample.size else (0.0, 1.0)
    return float(lo), float(max(hi, lo + 1e-6))


def _views(volume: np.ndarray, slices: tuple[int, int, int]) -> list[np.ndarray]:
    """The three 2-D views (rows, columns) of a RAS volume, in display orientation (see the module docstring)."""
    x, y, z = slices
    axial = volume[:, :, z].T[::-1, ::-1]  # rows: anterior..posterior, columns: right..left
    coronal = volume[:, y, :].T[::-1, ::-1]  # rows: superior..inferior, columns: right..left
    sagittal = volume[x, :, :].T[::-1, ::-1]  # rows: superior..inferior, columns: anterior..posterior
    return [axial, coronal, sagittal]


def _view_spacing(spacing: np.ndarray) -> list[tuple[float, float]]:
    """(row, column) spacing in mm of each view of :func:`_views`."""
    sx, sy, sz = (float(s) for s in spacing)
    return [(sy, sx), (sz, sx), (sz, sy)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _panel(gray: np.ndarray, labels: np.ndarray, size: tuple[int, int], palette: np.ndarray, lohi) -> Image.Image:
    """One view at ``size`` (width, height): windowed image with the labels blended and outlined."""
    lo, hi = lohi
    g = np.clip((gray - lo) / (hi - lo), 0.0, 1.0) * 255.0
    g_img = Image.fromarray(g.astype(np.uint8)).resize(size, Image.BILINEAR)
    lab = np.asarray(Image.fromarray(as_labels(labels).astype(np.int32)).resize(size, Image.NEAREST)).astype(np.int64)
    rgb = np.repeat(np.asarray(g_img, np.float64)[..., None], 3, axis=-1)
    mask = lab > 0
    colours = palette[np.clip(lab, 0, len(palette) - 1)].astype(np.float64)
    rgb[mask] = (1 - _ALPHA) * rgb[mask] + _ALPHA * colours[mask]
    edge = np.zeros_like(mask)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[1:, :] != lab[:-1, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, 1:] != lab[:, :-1]
    edge &= mask
    rgb[edge] = colours[edge]
    return Image.fromarray(rgb.astype(np.uint8))


def render_preview(
    image: Any,
    pred: Any,
    affine: Any,
    class_names: Sequence[str] | None = None,
    title: str = "",
    label: Any | None = None,
    window: Sequence[float] | None = None,
    width: int = 1200,
) -> Image.Image:
    """The preview picture: a row of axial, coronal, sagittal views of ``pred`` (and a row of ``label``), a legend.

    Args:
        image: the image on the prediction's grid, ``(X, Y, Z)`` or ``(1, X, Y, Z)``, any intensities.
        pred: the label map, same grid (one-hot ``(C, X, Y, Z)``: argmax).
        affine: the grid's 4x4 affine (orientation and spacing).
        class_names: names by class index, background first (legend); default ``class <i>``.
        title: the first line of the header (the case name); with ``label``, the mean Dice is added.
        label: the reference label map on the same grid (evaluation), drawn as a second row.
        window: (low, high) intensity window; default: :data:`CT_WINDOW` for CT, percentiles otherwise.
        width: width of the views' rows in pixels (the legend is added on the right); at least 800.

    Returns:
        the picture; its ``info`` holds ``panels`` (per row, the ``(left, top, width, height)`` of each view),
        ``slices`` (the RAS ``(x, y, z)`` cut) and ``dice`` (None without ``label``).

    Raises:
        ValueError: grids that differ, or ``width`` under 800.
    """
    if width < 800:
        raise ValueError(f"width must be at least 800 pixels, got {width}")
    img = _image_volume(image)  # views: only the three slices are copied
    rows_vol = [label_volume(pred)] + ([label_volume(label)] if label is not None else [])
    for v in rows_vol:
        if v.shape != img.shape:
            raise ValueError(f"the label map's grid {v.shape} differs from the image's {img.shape}")
    img_ras, spacing = to_ras(img, affine)
    rows_ras = [to_ras(v, affine)[0] for v in rows_vol]
    counts = [_class_counts(v) for v in rows_vol]
    slices = choose_slices(rows_ras[0] if counts[0][1:].any() or label is None else rows_ras[1])
    view_spacing = _view_spacing(spacing)
    gray_views = _views(img_ras, slices)
    mm = [(v.shape[0] * rs, v.shape[1] * cs) for v, (rs, cs) in zip(gray_views, view_spacing, strict=True)]
    gap = 8
    scale = (width - 2 * gap) / sum(w for _, w in mm)  # pixels per mm, one for all panels
    sizes = [(max(1, round(w * scale)), max(1, round(h * scale))) for h, w in mm]
    row_h = max(h for _, h in sizes)

    n_classes = max(len(c) for c in counts)
    names = list(class_names) if class_names is not None else []
    names += [f"class {i}" for i in range(len(names), max(n_classes, len(names)))]
    palette = label_palette(max(len(names), n_classes, 2))
    present = sorted({int(i) for c in counts for i in np.flatnonzero(c)} - {0})
    lohi = _window(img, window)

    font, small, big = _font(16), _font(14), _font(20)
    header = 56
    row_label_w = 26 if label is not None else 0
    legend_w = 40 + int(max([font.getlength(f"{c}  {names[c]}") for c in present] + [font.getlength("legend")]))
    canvas_w = row_label_w + width + legend_w
    strip = 22  # caption strip above each row of views: view, slice, and the edges' directions
    canvas_h = header + len(rows_ras) * (strip + row_h + gap) + 16
    legend_h = 34 + 22 * len(present)
    canvas_h = max(canvas_h, header + legend_h + 8)
    canvas = Image.new("RGB", (canvas_w, canvas_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    text, dice = title, None
    if label is not None:
        dice = case_dice(rows_vol[0], rows_vol[1], n_classes)
        text = f"{title}   mean Dice {dice:.3f}" if dice == dice else f"{title}   mean Dice n/a (no structure)"
    draw.text((10, 6), text, fill=_TEXT, font=big)
    sx, sy, sz = slices
    shape = img_ras.shape
    captions = [f"axial  z {sz + 1}/{shape[2]}", f"coronal  y {sy + 1}/{shape[1]}", f"sagittal  x {sx + 1}/{shape[0]}"]
    info = f"{spacing[0]:.2f} x {spacing[1]:.2f} x {spacing[2]:.2f} mm, window {lohi[0]:g}..{lohi[1]:g}"
    draw.text((10, 32), f"R = patient's right;  A = anterior;  S = superior;  {info}", fill=(170, 170, 170), font=small)
    boxes: list[list[tuple[int, int, int, int]]] = []
    for r, vol in enumerate(rows_ras):
        top = header + r * (strip + row_h + gap) + strip
        if label is not None:
            name = "prediction" if r == 0 else "label"
            tag = Image.new("RGB", (int(font.getlength(name)) + 4, 20), _BACKGROUND)
            ImageDraw.Draw(tag).text((2, 0), name, fill=_TEXT, font=font)
            tag = tag.rotate(90, expand=True)
            canvas.paste(tag, (3, top + max(0, (row_h - tag.height) // 2)))
        left = row_label_w
        boxes.append([])
        for i, (g, v, size) in enumerate(zip(gray_views, _views(vol, slices), sizes, strict=True)):
            canvas.paste(_panel(g, v, size, palette, lohi), (left, top))
            boxes[-1].append((left, top, size[0], size[1]))
            edge_left, edge_right = (("R", "L"), ("R", "L"), ("A", "P"))[i]
            caption_w = small.getlength(captions[i])
            draw.text((left + (size[0] - caption_w) / 2, top - strip + 2), captions[i], fill=_CAPTION, font=small)
            draw.text((left + 1, top - strip + 2), edge_left, fill=_CAPTION, font=small)
            draw.text(
                (left + size[0] - small.getlength(edge_right) - 1, top - strip + 2),
                edge_right,
                fill=_CAPTION,
                font=small,
            )
            left += size[0] + gap
    lx = row_label_w + width + 12
    draw.text((lx, header), "legend" if present else "no structure found", fill=_TEXT, font=font)
    for j, c in enumerate(present):
        y = header + 28 + 22 * j
        draw.rectangle((lx, y + 2, lx + 16, y + 16), fill=tuple(int(v) for v in palette[c]))
        draw.text((lx + 24, y), f"{c}  {names[c]}", fill=_TEXT, font=font)
    canvas.info.update({"panels": boxes, "slices": slices, "dice": dice})
    return canvas


def save_preview(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """:func:`render_preview` written to ``path`` as PNG (atomic). Returns ``path``."""
    picture = render_preview(*args, **kwargs)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data = buffer.getvalue()
    atomic_write(Path(path), lambda f: f.write(data))
    return Path(path)


def save_evaluation_preview(
    path: str | os.PathLike,
    item: dict,
    class_names: Sequence[str],
    case: str,
    image_key: str = "image",
    label_key: str = "label",
    pred_key: str = "pred",
    raw_key: str = "image_raw",
) -> Path:
    """The evaluation picture of one post-processed item: prediction and label rows, the case's mean Dice in the title.

    For ``custom.segmentation.report.EvaluationReport``: ``item`` holds the prediction and the label on the
    label's grid (after ``Invertd``); the image is the input read again in its original intensities (so CT
    gets its HU window) when the prediction names its file, else ``item[image_key]`` as it is.
    """
    pred, label = item[pred_key], item[label_key]
    source = source_of(pred)
    image = original_image(item, {}, raw_key, source) if source and os.path.exists(source) else item[image_key]
    affine = getattr(pred, "affine", None)
    affine = affine if affine is not None else getattr(label, "affine", np.eye(4))
    return save_preview(path, image, pred, affine, class_names, title=case, label=label)


class CasePreview(CaseOutputHandler):
    """Write ``<case>_preview.png`` for every case of an inference run (the input as loaded, the label map written).

    Args:
        output_dir: where the pictures go (``@output_dir``).
        class_names: names by class index, background first; or
        meta_file: a bundle's metadata.json to read them from.
        enabled: False attaches nothing (the bundle's ``preview`` switch).
        pred_key: the prediction's key (on the input's grid, after ``Invertd``).
        raw_key: item key of the image as loaded (else the input file is read again; see
            :func:`custom.inference.case_outputs.original_image`).
        width: width of the views in pixels.

    Raises:
        ValueError: neither or both of ``class_names`` and ``meta_file``; ``enabled`` not a bool.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        meta_file: str | os.PathLike | None = None,
        enabled: bool = True,
        pred_key: str = "pred",
        raw_key: str = "image_raw",
        width: int = 1200,
    ) -> None:
        super().__init__(output_dir, enabled, pred_key, "preview", class_names=class_names, meta_file=meta_file)
        self.raw_key = raw_key
        self.width = width

    def write_case(self, item: Mapping[str, Any], batch: Mapping[str, Any], case: str, source: str) -> None:
        pred = item[self.pred_key]
        image = original_image(item, batch, self.raw_key, source)  # type: ignore[arg-type]
        same_grid(image, pred, source)
        affine = getattr(pred, "affine", None)
        affine = affine if affine is not None else image.affine
        path = save_preview(
            self.output_dir / f"{case}_preview.png", image, pred, affine, self.class_names, title=case, width=self.width
        )
        logger.info(f"wrote {path}")
