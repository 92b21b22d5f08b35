"""Self-supervised pre-training parts: losses against hand-computed values, views, heads, export, DDP negatives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR

from custom.ssl import SSLHead, SSLLoss, SSLViews, released_to_ssl_state, ssl_state_to_released
from custom.weights import load_swinvit_weights


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent written out term by term: for each of the 2N embeddings, -log(exp(s_pos/t) / sum_{k != i} exp(s_ik/t))."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = [torch.dot(z[i], z[k]) / temperature for k in range(2 * n) if k != i]
        total = total - (torch.dot(z[i], z[pos]) / temperature - torch.logsumexp(torch.stack(sims), 0))
    return total / (2 * n)


def pred_and_target(n: int, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pred = {
        "rotation": torch.randn(2 * n, 4, generator=g),
        "contrastive": torch.randn(2 * n, dim, generator=g),
        "reconstruction": torch.rand(2 * n, 1, 4, 4, 4, generator=g),
    }
    target = {
        "rotation": torch.randint(0, 4, (2 * n,), generator=g),
        "reconstruction": torch.rand(2 * n, 1, 4, 4, 4, generator=g),
    }
    return pred, target


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dim", [4, 16])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_contrastive_term_matches_reference(n, dim, temperature):
    pred, target = pred_and_target(n, dim)
    loss = SSLLoss(rotation_weight=0, reconstruction_weight=0, temperature=temperature)
    value = loss(pred, target)
    z1, z2 = pred["contrastive"].chunk(2)
    assert value.item() == pytest.approx(reference_nt_xent(z1, z2, temperature).item(), rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_contrastive_of_collinear_embeddings_is_log_2n_minus_1(n):
    pred, target = pred_and_target(n)
    pred["contrastive"] = torch.ones(2 * n, 8) * 3.0
    loss = SSLLoss(rotation_weight=0, reconstruction_weight=0)
    assert loss(pred, target).item() == pytest.approx(math.log(2 * n - 1), abs=1e-5)


def test_terms_by_hand_and_weights():
    pred, target = pred_and_target(2)
    pred["rotation"] = torch.zeros(4, 4)  # uniform logits: CE = log 4
    pred["reconstruction"] = torch.zeros(4, 1, 4, 4, 4)
    target["reconstruction"] = torch.full((4, 1, 4, 4, 4), 0.25)  # L1 = 0.25
    loss = SSLLoss(rotation_weight=2.0, contrastive_weight=0.0, reconstruction_weight=3.0)
    total = loss(pred, target)
    assert loss.terms["rotation"].item() == pytest.approx(math.log(4))
    assert loss.terms["reconstruction"].item() == pytest.approx(0.25)
    assert total.item() == pytest.approx(2 * math.log(4) + 3 * 0.25)


def test_rotation_label_matches_the_applied_rotation():
    x = torch.rand(6, 1, 16, 16, 16)
    views = SSLViews(max_masked_fraction=0.0, swap=False, seed=1)(x)
    for b in range(6):
        for i in (1, 2):
            k = int(views[f"rotation{i}"][b])
            assert torch.equal(views[f"target{i}"][b], torch.rot90(x[b], k, dims=(2, 3)))  # plane (Y, Z)
            assert torch.equal(views[f"view{i}"][b], views[f"target{i}"][b])  # nothing masked at fraction 0
    assert set(torch.cat([views["rotation1"], views["rotation2"]]).tolist()) <= {0, 1, 2, 3}


def test_masked_fraction_within_bounds_and_view_agrees_outside_the_mask():
    x = torch.rand(32, 1, 32, 32, 32)
    views = SSLViews(swap=False, seed=2)(x)
    for i in (1, 2):
        mask = views[f"mask{i}"]
        fraction = mask.float().mean((1, 2, 3, 4))
        # target U(0, 0.3) of the volume; the box that crosses it (at most 0.25^3 of the crop) is kept
        assert (fraction <= 0.3 + 0.25**3 + 1e-6).all()
        assert 0.05 < fraction.mean() < 0.25  # about 0.15 on average, overlaps make it a little less
        view, target = views[f"view{i}"], views[f"target{i}"]
        assert torch.equal(view[~mask], target[~mask])
        assert view[mask].min() >= 0 and view[mask].max() <= 1


def test_box_rasterisers_agree():
    # the GPU's difference array and the CPU's slice assignments paint the same boxes
    views = SSLViews(seed=3)
    shape = (6, 1, 40, 33, 27)  # odd, unequal sizes: boxes touch every border
    boxes = views.draw_boxes(shape, torch.device("cpu"), views.generator(torch.device("cpu")))
    assert boxes[2].any(1).all()  # every sample keeps at least one box
    slices = SSLViews.rasterise(shape, *boxes, method="slices")
    assert torch.equal(SSLViews.rasterise(shape, *boxes, method="difference"), slices)
    assert slices.any() and not slices.all()


def test_noise_fill_is_min_max_normalised_on_the_masked_voxels():
    x = torch.full((2, 1, 16, 16, 16), 5.0)
    mask = torch.zeros(2, 1, 16, 16, 16, dtype=torch.bool)
    mask[0, :, :4], mask[1, :, 8:] = True, True
    out = SSLViews.noise_fill(x, mask, torch.Generator().manual_seed(0))
    assert torch.equal(out[~mask], x[~mask])
    for b in range(2):
        noise = out[b][mask[b]]
        assert noise.min() == 0 and noise.max() == 1 and 0.3 < noise.mean() < 0.7


def test_swapped_boxes_come_from_another_sample():
    x = torch.stack([torch.full((1, 32, 32, 32), float(v)) for v in (0.0, 1.0)])
    # the same seed without swapping gives the noise-corrupted views before the swap
    before = SSLViews(seed=4, swap=False)(x)["view1"]
    after = SSLViews(seed=4)(x)["view1"]
    changed = after != before
    assert changed[0].any() and changed[1].any()
    # with two samples each one's partner is the other: swapped voxels hold the other's (corrupted) view
    assert torch.equal(after[0][changed[0]], before[1][changed[0]])
    assert torch.equal(after[1][changed[1]], before[0][changed[1]])


def test_views_are_deterministic_under_a_seed():
    x = torch.rand(4, 1, 32, 32, 32)
    a, b, c = SSLViews(seed=7), SSLViews(seed=7), SSLViews(seed=8)
    va, vb, vc = a(x), b(x), c(x)
    assert all(torch.equal(va[k], vb[k]) for k in va)
    assert not torch.equal(va["view1"], vc["view1"])
    a.reset()
    assert torch.equal(a(x)["view2"], va["view2"])


@pytest.mark.parametrize("kwargs", [{"rotation_dims": (0, 0)}, {"max_masked_fraction": 1.5}, {"box_size": (0.3, 0.1)}])
def test_views_reject_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SSLViews(**kwargs)


def test_views_reject_non_square_rotation_plane():
    with pytest.raises(ValueError, match="square"):
        SSLViews(seed=0)(torch.rand(2, 1, 32, 32, 64))


def test_head_shapes_and_size_check():
    model = SSLHead(feature_size=12)
    out = model(torch.rand(2, 1, 64, 64, 64))
    assert out["rotation"].shape == (2, 4) and out["contrastive"].shape == (2, 512)
    assert out["reconstruction"].shape == (2, 1, 64, 64, 64)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.rand(1, 1, 48, 64, 64))


def test_export_loads_into_swinunetr_and_back_into_the_ssl_model(tmp_path):
    model = SSLHead(feature_size=12)
    torch.save(ssl_state_to_released(model.state_dict()), tmp_path / "model_swinvit.pt")
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    report = load_swinvit_weights(net, tmp_path / "model_swinvit.pt")
    assert len(report.matched) == 126 and not report.missing
    assert all(
        k.startswith(("module.rotation_head", "module.contrastive_head", "module.reconstruction_head"))
        for k in report.ignored
    )
    assert torch.equal(
        net.swinViT.layers4[0].blocks[1].mlp.linear2.weight, model.swinViT.layers4[0].blocks[1].mlp.linear2.weight
    )
    again = SSLHead(feature_size=12)
    again.load_state_dict(released_to_ssl_state(torch.load(tmp_path / "model_swinvit.pt", weights_only=True)))  # strict
    assert torch.equal(again.rotation_head.weight, model.rotation_head.weight)


def _ddp_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    pred, target = pred_and_target(n=2 * world, seed=11)  # the global batch: 2 samples per rank per view
    z1, z2 = pred["contrastive"].chunk(2)
    mine = slice(2 * rank, 2 * rank + 2)
    local = torch.cat([z1[mine], z2[mine]]).clone().requires_grad_(True)
    loss = SSLLoss(rotation_weight=0, reconstruction_weight=0)
    value = loss({**pred, "contrastive": local}, target)
    value.backward()
    results[rank] = (value.item(), local.grad.clone())
    dist.destroy_process_group()


def test_global_negatives_under_ddp_equal_one_big_batch(tmp_path):
    """2 ranks x 2 samples give the loss (and, after DDP's averaging, the gradient) of 1 rank x 4 samples."""
    world = 2
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), results), nprocs=world, join=True)

    pred, target = pred_and_target(n=2 * world, seed=11)
    z = pred["contrastive"].clone().requires_grad_(True)
    single = SSLLoss(rotation_weight=0, reconstruction_weight=0)({**pred, "contrastive": z}, target)
    single.backward()
    z1_grad, z2_grad = z.grad.chunk(2)
    for rank in range(world):
        value, grad = results[rank]
        assert value == pytest.approx(single.item(), rel=1e-6)
        mine = slice(2 * rank, 2 * rank + 2)
        # each rank holds W x its share of the gradient: DDP's mean over ranks restores the full one
        assert torch.allclose(grad / world, torch.cat([z1_grad[mine], z2_grad[mine]]), atol=1e-6)
