"""Self-supervised pre-training parts: losses against hand-computed values, views, heads, export, DDP negatives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR

from custom.networks.ssl import SSLHead, SSLLoss, SSLViews, released_to_ssl_state, ssl_state_to_released
from custom.networks.weights import load_swinvit_weights


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
    # box indices: the GPU's maximum over boxes and the CPU's painting in order agree, later boxes on top
    ids = SSLViews.box_ids(shape, *boxes, method="slices")
    assert torch.equal(SSLViews.box_ids(shape, *boxes, method="max", chunk=5), ids)
    assert torch.equal(ids >= 0, slices)
    starts, ends, keep = boxes
    last = int(keep[0].sum()) - 1
    corner = tuple(int(s[0, last]) for s in starts)
    assert ids[(0, 0, *corner)] == last  # the last kept box shows at its own corner


def test_box_edges_and_clipping_follow_the_research_code():
    """research ``patch_rand_drop`` at 96: edges ``randint(4, 24)``, start ``randint(0, 92)``, end clipped at 96."""
    views = SSLViews(seed=5)
    assert views.edge_range(96) == (4, 24)
    starts, ends, _ = views.draw_boxes((64, 1, 96, 96, 96), torch.device("cpu"), views.generator(torch.device("cpu")))
    for start, end in zip(starts, ends, strict=True):
        size = end - start
        assert size.min() == 4 and size.max() == 23  # not 5..24
        assert start.min() == 0 and start.max() == 91 and end.max() == 96
        # clipping at the far border: about 15 % of boxes end there (fully inside the crop: about 1 %)
        assert 0.10 < (end == 96).float().mean() < 0.20


def _research_noise_std(size: int, draws: int, seed: int) -> float:
    import random

    from bench.research_views import loop_views

    rng, x, stds = random.Random(seed), torch.zeros(1, 1, size, size, size), []
    for _ in range(draws):
        v = loop_views(x, rng=rng)  # batch 1: never a swap, only noise boxes
        stds.append(v["view1"][v["mask1"]].std().item())
    return sum(stds) / len(stds)


def test_noise_is_scaled_per_box_as_in_the_research_code():
    # two boxes per sample: each box's noise spans 0..1 on its own (scaled per sample, only one box would)
    x = torch.full((2, 1, 16, 16, 16), 5.0)
    ids = torch.full((2, 1, 16, 16, 16), -1, dtype=torch.int16)
    ids[0, :, :4], ids[0, :, 8:12], ids[1, :, 2:6, :8], ids[1, :, 2:6, 8:] = 0, 1, 0, 1
    for method in ("dense", "masked"):
        out = SSLViews.noise_fill(x, ids, torch.Generator().manual_seed(0), num_boxes=4, method=method)
        assert torch.equal(out[ids < 0], x[ids < 0])
        for b in range(2):
            for box in (0, 1):
                noise = out[b][ids[b] == box]
                assert noise.min() == 0 and noise.max() == 1 and 0.3 < noise.mean() < 0.7
    # whole views: the spread of the noise matches the research-style loop (per-sample scaling: 0.115 vs 0.147)
    views, stds = SSLViews(seed=6, swap=False), []
    for _ in range(24):
        v = views(torch.zeros(1, 1, 64, 64, 64))
        stds.append(v["view1"][v["mask1"]].std().item())
    ours, research = sum(stds) / len(stds), _research_noise_std(64, 24, seed=6)
    assert abs(ours - research) < 0.012, (ours, research)


def test_swapped_boxes_come_from_the_partner_and_a_sample_drawing_itself_gets_none():
    x = torch.stack([torch.full((1, 16, 16, 16), float(v)) for v in (0.0, 1.0)])
    seen = set()
    for seed in range(40):
        # the same seed without swapping gives the noise-corrupted views before the swap
        before = SSLViews(seed=seed, swap=False)(x)["view1"]
        out = SSLViews(seed=seed)(x)
        after, partner, mask = out["view1"], out["partner1"], out["mask1"]
        for b in range(2):
            changed = after[b] != before[b]
            if int(partner[b]) == b:
                seen.add("itself")
                assert not changed.any()  # research: skipped when the partner is the sample itself
            else:
                seen.add("other")
                assert changed.any() and mask[b][changed].all()
                assert torch.equal(after[b][changed], before[1 - b][changed])
    assert seen == {"itself", "other"}


@pytest.mark.parametrize("batch", [2, 4])
def test_swap_is_skipped_with_probability_one_over_the_batch(batch):
    views = SSLViews(seed=9)
    gen = views.generator(torch.device("cpu"))
    skipped, n = 0, 300
    for _ in range(n):
        _, _, partner = views.corrupt(torch.rand(batch, 1, 8, 8, 8), gen)
        skipped += int((partner == torch.arange(batch)).sum())
    # binomial: mean 1/B of the samples, 4 standard deviations either side
    p, total = 1 / batch, n * batch
    assert abs(skipped / total - p) < 4 * math.sqrt(p * (1 - p) / total)


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
