"""The body crop at inference (custom/inference/body_crop.py): a synthetic body in air, tiny sizes, CPU."""

from __future__ import annotations

import itertools
import logging
from collections import deque

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor, dense_patch_slices
from monai.engines import SupervisedEvaluator
from monai.inferers import SimpleInferer, SlidingWindowInferer, sliding_window_inference

from custom.inference.body_crop import (
    BACKGROUND_LOGIT,
    BodyCropInferer,
    body_box,
    body_crop_inferer,
    count_windows,
    hu_to_window,
    largest_component,
    roi_box,
    window_box,
)

SHAPE = (64, 64, 48)
ROI = (16, 16, 16)
CENTRE, RADII = (32, 36, 24), (14, 10, 12)


class PerVoxel(torch.nn.Module):
    """A 1x1x1 convolution (the output at a voxel depends on that voxel only) that counts its windows."""

    def __init__(self, out_channels: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, out_channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-2.0, 3.0, out_channels).view(out_channels, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.linspace(1.0, -1.5, out_channels))
        self.windows = 0

    def forward(self, x):
        self.windows += x.shape[0]
        return self.conv(x)


class ConvNet(torch.nn.Module):
    """Two 3x3x3 convolutions: each output voxel sees its neighbours (and the window's zero padding at its faces)."""

    def __init__(self, out_channels: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, out_channels, 3, padding=1)
        )
        self.windows = 0

    def forward(self, x):
        self.windows += x.shape[0]
        return self.net(x)


def ellipsoid(shape=SHAPE, centre=CENTRE, radii=RADII) -> torch.Tensor:
    grid = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def ct_body(speck: bool = True) -> torch.Tensor:
    """1, 1, 64, 64, 48: air at 0 (the window's minimum), tissue 0.3..0.6, an organ blob at 0.9, a speck in the air."""
    g = torch.Generator().manual_seed(0)
    body = ellipsoid()
    image = torch.where(body, 0.3 + 0.3 * torch.rand(SHAPE, generator=g), torch.zeros(SHAPE))
    image[ellipsoid(radii=(4, 4, 4))] = 0.9
    if speck:
        image[1:4, 1:4, 1:4] = 0.5  # noise or a table part, apart from the body
    return image[None, None]


def sliding(overlap: float = 0.5, sw_batch_size: int = 4) -> SlidingWindowInferer:
    return SlidingWindowInferer(ROI, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")


def box_of(mask: torch.Tensor) -> tuple[slice, ...]:
    hits = torch.nonzero(mask)
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(hits.min(0).values, hits.max(0).values, strict=True))


def inside(box: tuple[slice, ...]) -> torch.Tensor:
    keep = torch.zeros(SHAPE, dtype=torch.bool)
    keep[box] = True
    return keep


@pytest.mark.parametrize(
    "image_size,roi_size,overlap",
    [
        ((7, 33, 20), (4, 8, 5), 0.5),
        ((16, 16, 16), (16, 16, 16), 0.5),  # image = ROI: one window
        ((10, 5, 12), (16, 8, 4), 0.25),  # smaller than the ROI in two dimensions: padded
        ((30, 31, 29), (8, 8, 8), 0.0),
        ((30, 31, 29), (8, 6, 10), 0.75),
        ((23, 17, 9), (5, 5, 5), (0.1, 0.6, 0.9)),
        ((9, 9, 9), (4, 4, 4), 0.7),  # int(4 * 0.3) = 1: interval 1
        ((12, 13, 14), 5, 0.5),  # one int for all dimensions
    ],
)
def test_count_windows_is_the_number_monai_runs(image_size, roi_size, overlap):
    calls = []

    def predictor(x):
        calls.append(x.shape[0])
        return x

    sliding_window_inference(torch.zeros(1, 1, *image_size), roi_size, 3, predictor, overlap=overlap)
    assert count_windows(image_size, roi_size, overlap) == sum(calls)


def test_count_windows_matches_monai_slices_at_btcv_size():
    # ct_full at 1.5 x 1.5 x 2.0 mm, ROI 96^3: MONAI's scan interval int(96 * (1 - overlap))
    for overlap in (0.25, 0.5, 0.75):
        interval = int(96 * (1 - overlap))
        slices = dense_patch_slices((243, 201, 168), (96, 96, 96), (interval,) * 3)
        assert count_windows((243, 201, 168), (96, 96, 96), overlap) == len(slices)
    assert count_windows((243, 201, 168), (96, 96, 96), 0.5) == 60


def monai_windows_meeting(box, overlap=0.5):
    """MONAI's own windows over the whole image that overlap ``box``."""
    slices = dense_patch_slices(SHAPE, ROI, [int(r * (1 - overlap)) for r in ROI])
    return [w for w in slices if all(s.start < b.stop and s.stop > b.start for s, b in zip(w, box, strict=True))]


@pytest.mark.parametrize("sw_batch_size", [1, 4])
def test_windows_skipped_output_identical_inside_background_outside(caplog, sw_batch_size):
    image = ct_body()
    net = ConvNet()
    with torch.no_grad():
        full = sliding(sw_batch_size=sw_batch_size)(image, net)
        full_windows, net.windows = net.windows, 0
        crop = BodyCropInferer(sliding(sw_batch_size=sw_batch_size), margin=3, outside="softmax")
        with caplog.at_level(logging.INFO, logger="custom.inference.body_crop"):
            out = crop(image, net)
    # the body box is the ellipsoid's bounding box plus the margin (the speck in the corner is dropped)
    body = tuple(slice(b.start - 3, b.stop + 3) for b in box_of(ellipsoid()))
    assert crop.last_body_box == body
    # the run box is the union of MONAI's windows that meet it, and only those ran
    meeting = monai_windows_meeting(body)
    assert crop.last_box == tuple(
        slice(min(w[d].start for w in meeting), max(w[d].stop for w in meeting)) for d in range(3)
    )
    assert net.windows == len(meeting) < full_windows == count_windows(SHAPE, ROI, 0.5)
    assert crop.last_windows == (net.windows, full_windows)
    assert f"{net.windows} of {full_windows} windows" in caplog.text
    # inside the body box: the uncropped output (same windows, weights and order); bit-exact one window at a time
    keep = inside(body)
    assert out.shape == full.shape
    if sw_batch_size == 1:
        assert torch.equal(out[0][:, keep], full[0][:, keep])
    torch.testing.assert_close(out[0][:, keep], full[0][:, keep], rtol=1e-6, atol=1e-6)
    assert torch.equal(out.argmax(1)[0][keep], full.argmax(1)[0][keep])
    # outside the run box: background, softmax (1, 0, 0) to within float32
    outside = ~inside(crop.last_box)
    prob = out.softmax(1)[0][:, outside]
    assert bool((out.argmax(1)[0][outside] == 0).all())
    assert bool((prob[0] == 1.0).all()) and float(prob[1:].max()) < 1e-20


def test_a_body_that_needs_every_window_runs_the_whole_image():
    image = torch.full((1, 1, *SHAPE), 0.4)
    net = ConvNet()
    with torch.no_grad():
        full = sliding()(image, net)
        crop = BodyCropInferer(sliding())
        out = crop(image, net)
    total = count_windows(SHAPE, ROI, 0.5)
    assert crop.last_windows == (total, total) and net.windows == 2 * total
    assert torch.equal(out, full)


def test_box_tiling_runs_fewer_windows_and_keeps_a_per_voxel_output():
    image = ct_body()
    net = PerVoxel()
    with torch.no_grad():
        full = sliding()(image, net)
        aligned = BodyCropInferer(sliding(), margin=3)
        aligned(image, net)
        net.windows = 0
        crop = BodyCropInferer(sliding(), margin=3, tiling="box")
        out = crop(image, net)
    body = crop.last_body_box
    assert crop.last_box == body  # larger than the ROI already
    assert net.windows == count_windows([s.stop - s.start for s in body], ROI, 0.5) < aligned.last_windows[0]
    # windows elsewhere: the same values only for a network that looks at one voxel at a time
    keep = inside(body)
    torch.testing.assert_close(out[0][:, keep], full[0][:, keep], rtol=1e-5, atol=1e-5)
    assert bool((out.argmax(1)[0][~keep] == 0).all())


def test_sigmoid_outside_is_below_any_threshold():
    image = ct_body()
    with torch.no_grad():
        crop = BodyCropInferer(sliding(), outside="sigmoid")
        out = crop(image, PerVoxel(out_channels=3))
    keep = inside(crop.last_box)
    assert bool((~keep).any())
    assert bool((out[0][:, ~keep] == -BACKGROUND_LOGIT).all())
    assert float(torch.sigmoid(out[0][:, ~keep]).max()) < 1e-20


def test_mri_nonzero_keeps_negative_z_scores_in_the_body():
    g = torch.Generator().manual_seed(1)
    body = ellipsoid()
    # z-scored over its non-zero voxels: half the body is negative; the background is exactly 0
    image = torch.where(body, torch.randn(SHAPE, generator=g), torch.zeros(SHAPE))
    image[body & (image == 0)] = 0.1
    image[:, :, : CENTRE[2]][body[:, :, : CENTRE[2]]] = -1.0  # the lower half of the body all negative
    image = image[None, None].repeat(1, 2, 1, 1, 1)  # two channels (e.g. prostate T2, ADC)
    image[:, 1] = 0
    with torch.no_grad():
        crop = BodyCropInferer(sliding(), mode="nonzero", margin=0, outside="softmax")
        crop(image, torch.nn.Conv3d(2, 2, 1))
        assert crop.last_body_box == box_of(body)
        above = BodyCropInferer(sliding(), mode="above", threshold=0.0, margin=0)
        assert above.box(image)[2].start > box_of(body)[2].start  # the "CT" rule would cut the body


def test_empty_mask_falls_back_to_the_whole_image(caplog):
    image = torch.zeros(1, 1, *SHAPE)
    net = PerVoxel()
    with torch.no_grad():
        full = sliding()(image, net)
        net.windows = 0
        crop = BodyCropInferer(sliding())
        with caplog.at_level(logging.INFO, logger="custom.inference.body_crop"):
            out = crop(image, net)
    total = count_windows(SHAPE, ROI, 0.5)
    assert crop.last_box is None and crop.last_windows == (total, total) and net.windows == total
    assert "no body found" in caplog.text
    assert torch.equal(out, full)


def test_batch_of_two_runs_on_the_union_box():
    first = ct_body(speck=False)
    second = torch.zeros_like(first)
    second[0, 0][ellipsoid(centre=(12, 12, 10), radii=(9, 9, 9))] = 0.5
    net = PerVoxel()
    with torch.no_grad():
        crop = BodyCropInferer(sliding(), margin=0)
        out = crop(torch.cat([first, second]), net)
    union = box_of(ellipsoid() | ellipsoid(centre=(12, 12, 10), radii=(9, 9, 9)))
    assert crop.last_body_box == union
    assert crop.last_box == window_box(union, SHAPE, ROI, 0.5)
    assert net.windows == 2 * len(monai_windows_meeting(union))
    assert out.shape == (2, 3, *SHAPE)


def test_small_body_runs_the_windows_that_cover_it():
    image = torch.zeros(1, 1, *SHAPE)
    image[0, 0, 61:63, 0:2, 20:22] = 0.5  # a few voxels at a corner
    net = PerVoxel()
    with torch.no_grad():
        crop = BodyCropInferer(sliding(), margin=2)
        out = crop(image, net)
    assert crop.last_body_box == (slice(59, 64), slice(0, 4), slice(18, 24))
    assert crop.last_box == (slice(48, 64), slice(0, 16), slice(8, 32))
    assert net.windows == 2 == len(monai_windows_meeting(crop.last_body_box))
    assert out.shape == (1, 3, *SHAPE)


def test_box_rule():
    mask = torch.zeros(40, 30, 8, dtype=torch.bool)
    mask[10:20, 5:6, 2:4] = True
    # the margin, clipped to the image
    assert body_box(mask, margin=(2, 8, 1)) == (slice(8, 22), slice(0, 14), slice(1, 5))
    assert body_box(torch.zeros(4, 4, 4, dtype=torch.bool)) is None
    # grown to the ROI around the centre, inside the image; the image smaller than the ROI: all of it
    assert roi_box((slice(8, 22), slice(0, 14), slice(1, 5)), (40, 30, 8), 16) == (
        slice(7, 23),
        slice(0, 16),
        slice(0, 8),
    )
    assert roi_box((slice(36, 40), slice(10, 12), slice(0, 8)), (40, 30, 8), 16) == (
        slice(24, 40),
        slice(3, 19),
        slice(0, 8),
    )
    # the windows meeting the box (y: starts 0, 8 and the last one shifted back to 14); z not larger than the ROI: whole
    assert window_box((slice(8, 22), slice(0, 14), slice(1, 5)), (40, 30, 8), (16, 16, 16), 0.5) == (
        slice(0, 32),
        slice(0, 24),
        slice(0, 8),
    )


def reference_largest(mask: np.ndarray) -> np.ndarray:
    """Breadth-first search, 26-connectivity: the plain reference."""
    labels = np.zeros(mask.shape, dtype=int)
    sizes = [0]
    steps = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        sizes.append(0)
        labels[start] = len(sizes) - 1
        queue = deque([start])
        while queue:
            p = queue.popleft()
            sizes[-1] += 1
            for d in steps:
                q = tuple(a + b for a, b in zip(p, d, strict=True))
                if all(0 <= c < s for c, s in zip(q, mask.shape, strict=True)) and mask[q] and not labels[q]:
                    labels[q] = labels[start]
                    queue.append(q)
    return labels == int(np.argmax(sizes)) if len(sizes) > 1 else np.zeros_like(mask)


@pytest.mark.parametrize("seed,density", [(0, 0.25), (1, 0.3), (2, 0.35)])
def test_largest_component_at_block_1_is_the_exact_26_connected_one(seed, density):
    mask = torch.rand(12, 11, 10, generator=torch.Generator().manual_seed(seed)) < density
    assert np.array_equal(largest_component(mask, block=1).numpy(), reference_largest(mask.numpy()))


def test_coarse_blocks_join_parts_closer_than_a_block_and_drop_distant_ones():
    mask = torch.zeros(32, 32, 32, dtype=torch.bool)
    mask[4:14, 4:14, 4:14] = True
    mask[15:17, 4:14, 4:14] = True  # one voxel of air between: one component on 4^3 blocks
    mask[28:30, 28:30, 28:30] = True  # far away: dropped
    kept = largest_component(mask, block=4)
    assert int(kept.sum()) == 1000 + 200
    assert int(largest_component(mask, block=1).sum()) == 1000


def test_hu_threshold_conversion():
    assert hu_to_window(-175, (-175, 250)) == 0.0 == hu_to_window(-1000, (-175, 250))
    assert hu_to_window(250, (-175, 250)) == 1.0
    assert hu_to_window(-500, (-1000, 1000)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="a_max must be above a_min"):
        hu_to_window(0, (250, -175))


def test_metatensor_input_keeps_its_metadata_in_the_evaluator():
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))
    data = [{"image": MetaTensor(ct_body()[0], affine=affine), "label": torch.zeros(1, *SHAPE)}]
    preds = {}
    for crop in (False, True):
        net = PerVoxel()
        evaluator = SupervisedEvaluator(
            device=torch.device("cpu"),
            val_data_loader=DataLoader(data, batch_size=1),
            network=net,
            inferer=body_crop_inferer(sliding(), crop, outside="softmax"),
        )
        evaluator.run()
        preds[crop] = evaluator.state.output[0]["pred"]
    pred, plain = preds[True], preds[False]
    assert isinstance(pred, MetaTensor) and pred.shape == plain.shape == (3, *SHAPE)
    assert torch.equal(pred.affine, affine) and torch.equal(plain.affine, affine)
    assert pred.meta.keys() == plain.meta.keys()
    assert net.windows < count_windows(SHAPE, ROI, 0.5)


def test_switch_and_bad_arguments():
    inferer = sliding()
    assert body_crop_inferer(inferer, False) is inferer
    assert isinstance(body_crop_inferer(inferer, True, mode="nonzero"), BodyCropInferer)
    with pytest.raises(TypeError, match="body_crop must be True or False"):
        body_crop_inferer(inferer, "false")
    with pytest.raises(TypeError, match="sliding-window inferer"):
        BodyCropInferer(SimpleInferer())
    with pytest.raises(ValueError, match="mode 'otsu'"):
        BodyCropInferer(inferer, mode="otsu")
    with pytest.raises(ValueError, match="outside 'tanh'"):
        BodyCropInferer(inferer, outside="tanh")
    with pytest.raises(ValueError, match="tiling 'grid'"):
        BodyCropInferer(inferer, tiling="grid")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        BodyCropInferer(inferer, margin=-1)
    with pytest.raises(ValueError, match="B, C, X, Y, Z"):
        BodyCropInferer(inferer)(torch.zeros(1, 8, 8, 8), PerVoxel())


#: the wiring proposed for inference.json / evaluate.json (the coordinator owns the configs)
CONFIG = {
    "roi_size": [16, 16, 16],
    "sw_batch_size": 4,
    "overlap": 0.5,
    "body_crop": True,
    "region_based": False,
    "window": [-175, 250],
    "sliding_window": {
        "_target_": "SlidingWindowInferer",
        "roi_size": "@roi_size",
        "sw_batch_size": "@sw_batch_size",
        "overlap": "@overlap",
        "mode": "gaussian",
    },
    "inferer": {
        "_target_": "custom.inference.body_crop.body_crop_inferer",
        "inferer": "@sliding_window",
        "enabled": "@body_crop",
        "mode": "$'above' if @window is not None else 'nonzero'",
        "outside": "$'sigmoid' if @region_based else 'softmax'",
    },
}


def test_config_wiring_builds_the_crop_and_the_switch_turns_it_off():
    from monai.bundle import ConfigParser

    def inferer(**overrides):
        parser = ConfigParser({**CONFIG, **overrides})
        return parser.get_parsed_content("inferer")

    crop = inferer()
    assert isinstance(crop, BodyCropInferer) and crop.mode == "above" and crop.outside == "softmax"
    assert isinstance(crop.inferer, SlidingWindowInferer) and list(crop.inferer.roi_size) == [16, 16, 16]
    mri = inferer(window=None, region_based=True)
    assert mri.mode == "nonzero" and mri.outside == "sigmoid"
    assert type(inferer(body_crop=False)) is SlidingWindowInferer
    with pytest.raises(RuntimeError) as refused:  # MONAI's instantiation error, caused by ours
        inferer(body_crop="false")
    assert "body_crop must be True or False" in str(refused.value.__cause__)
