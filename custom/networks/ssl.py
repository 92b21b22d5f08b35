"""Self-supervised pre-training of the Swin UNETR encoder (Tang et al., CVPR 2022): model, views, loss.

MONAI has the encoder (``SwinTransformer``, as used inside ``SwinUNETR``), the blocks and the NT-Xent
loss (``ContrastiveLoss``); it has none of the paper's proxy-task heads, its view generation or the
combined loss. What is here, with the source of each recipe fact:

- :class:`SSLHead`: the encoder plus three heads on its last stage (16 x feature_size channels at
  1/32 of the input): a 4-way rotation classifier on the first token, a 512-d contrastive projection
  on the second token, and a reconstruction decoder of five (3^3 conv, instance norm, LeakyReLU,
  x2 trilinear upsampling) blocks halving the channels down to feature_size, then a 1^3 conv
  (paper and its research code).
- :class:`SSLViews`: two views per crop, each rotated by k x 90 degrees in one plane (k is the
  rotation label), then corrupted by masked-volume inpainting: random boxes are filled with noise
  until their summed volume reaches U(0, 0.3) of the crop, then a second set of boxes is swapped in
  from a random sample of the batch (none when that is the sample itself). Box edges, border
  clipping, per-box noise scaling and the swap partner follow the research code
  (``SwinUNETR/Pretrain/utils/ops.py``: ``patch_rand_drop``, ``aug_rand``), which does this per sample
  in Python loops with host round trips; here it is batched on the training device: a fixed pool of
  candidate boxes per sample, painted with tensor operations, no host sync on a GPU.
- :class:`SSLLoss`: cross-entropy of the rotation (both views) + NT-Xent (temperature 0.5, positives
  = the two views) + L1 between the reconstruction and the uncorrupted rotated view; weights 1/1/1,
  each term reported. Under DDP the contrastive embeddings are gathered from every rank (gradients
  flow to the local part) so the negatives are the global batch; the research code kept negatives
  per GPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from monai.networks.blocks import Convolution
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from custom.networks.recipe import RECIPE_FORMAT
from custom.networks.weights import ENCODER_PREFIX, monai_to_released_key, released_to_monai_key

__all__ = [
    "SSLHead",
    "ReconstructionDecoder",
    "SSLViews",
    "SSLLoss",
    "gather_with_local_grad",
    "ssl_state_to_released",
    "released_to_ssl_state",
]


class ReconstructionDecoder(nn.Sequential):
    """Feature map ``(B, dim, d, h, w)`` -> image ``(B, out_channels, 32d, 32h, 32w)``.

    Five blocks of (conv 3^3 -> instance norm -> LeakyReLU -> x2 trilinear upsampling) with channels
    dim -> dim/2 -> dim/4 -> dim/8 -> dim/16 -> dim/16, then a 1^3 conv (the paper's decoder).
    """

    def __init__(self, dim: int, out_channels: int = 1, num_blocks: int = 5) -> None:
        chans = [dim] + [max(dim // 2 ** (i + 1), dim // 16) for i in range(num_blocks)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            layers += [
                Convolution(3, c_in, c_out, kernel_size=3, norm="instance", act=("leakyrelu", {"inplace": True})),
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            ]
        layers.append(nn.Conv3d(chans[-1], out_channels, kernel_size=1))
        super().__init__(*layers)


class SSLHead(nn.Module):
    """Swin encoder with the rotation, contrastive and reconstruction heads.

    Args:
        in_channels: image channels (1 for CT).
        feature_size: encoder width; the last stage has ``16 * feature_size`` channels (768 at 48).
        use_checkpoint: gradient checkpointing in the encoder (less memory, slower steps).
        downsample: ``"merging"`` (MONAI >= 1.5) or a patch-merging class (see ``custom.networks.options``).
        rotation_classes: 4 (0, 90, 180, 270 degrees).
        contrastive_dim: 512 in the paper.

    The encoder is stored as ``swinViT``, as in ``SwinUNETR``, so its weights move between the two
    by name. Input ``(B, C, X, Y, Z)`` with every spatial size a multiple of 32.

    Returns from ``forward`` a dict: ``rotation`` ``(B, 4)`` logits, ``contrastive`` ``(B, 512)``,
    ``reconstruction`` ``(B, C, X, Y, Z)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        use_checkpoint: bool = False,
        downsample: str | type[nn.Module] = "merging",
        rotation_classes: int = 4,
        contrastive_dim: int = 512,
    ) -> None:
        super().__init__()
        if feature_size % 12 != 0:
            raise ValueError(f"feature_size must be divisible by 12 (heads 3,6,12,24), got {feature_size}.")
        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(7, 7, 7),
            patch_size=(2, 2, 2),
            depths=(2, 2, 2, 2),
            num_heads=(3, 6, 12, 24),
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
            downsample=downsample,
        )
        dim = 16 * feature_size
        self.rotation_head = nn.Linear(dim, rotation_classes)
        self.contrastive_head = nn.Linear(dim, contrastive_dim)
        self.reconstruction_head = ReconstructionDecoder(dim, out_channels=in_channels)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bad = [s for s in x.shape[2:] if s % 32]
        if x.ndim != 5 or bad:
            raise ValueError(f"SSLHead expects (B, C, X, Y, Z) with sizes divisible by 32, got {tuple(x.shape)}.")
        features = self.swinViT(x.contiguous())[4]  # (B, 16F, X/32, Y/32, Z/32)
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, 16F)
        return {
            "rotation": self.rotation_head(tokens[:, 0]),
            "contrastive": self.contrastive_head(tokens[:, 1]),
            "reconstruction": self.reconstruction_head(features),
        }


class SSLViews:
    """Batched view generation on the training device: rotation, then inpainting corruption.

    Args:
        rotation_dims: the two spatial axes of the rotation plane, counted in the ``(X, Y, Z)`` of
            the crop (0-based). ``(1, 2)`` is the research code's plane; it must be square.
        max_masked_fraction: each sample's noise target is U(0, this) of the crop volume (0.3).
        box_size: box edge range as fractions ``(lo, hi)`` of the crop size per axis, read as the
            research code reads its ``tolr`` 0.05 and ``max_block_sz`` 0.25: edges are integers in
            ``[int(lo * size), int(hi * size))`` (4-23 voxels at 96; at least 1), the box's first voxel
            lies in ``[0, size - int(lo * size))``, and a box running past the border is clipped
            there (its clipped volume is what counts towards the target).
        max_boxes: candidate boxes per sample and pass; boxes are used in order until their summed
            volume reaches the target (at the defaults and 96^3: 62 needed on average, 132 at the
            99th percentile, at most 141 in 4,000 draws; 192 leave a margin; measured).
        swap: also swap in boxes from another sample of the batch: each sample draws a partner
            uniformly among the batch, itself included, and a sample that draws itself gets no
            swapped boxes (probability 1/B), as in the research code (needs batch size > 1).
        seed: seed of the generator these views own (one per device); None draws one from torch's
            global generator (so it follows ``set_determinism``/``custom.utils.seed_everything``).

    Calling it on ``x`` ``(B, C, X, Y, Z)`` returns a dict: ``view1``, ``view2`` (corrupted inputs),
    ``target1``, ``target2`` (rotated, uncorrupted), ``rotation1``, ``rotation2`` (``(B,)`` labels
    k in 0..3), ``mask1``, ``mask2`` (``(B, 1, X, Y, Z)`` bool, voxels replaced by noise or swap),
    ``partner1``, ``partner2`` (``(B,)``: the sample whose boxes were swapped in, the sample itself
    when none were).

    Differences from the research code, each on purpose: the noise of a box is min-max scaled over
    the voxels of that box still showing after later boxes are painted (the research code scales
    over the whole box before later boxes overwrite parts of it: the same when boxes do not overlap,
    and a few thousand voxels per box either way); the swapped-in voxels come from the partner's
    noise-corrupted view before its own swap (the research loop corrupts in place, so the partner
    is fully corrupted when it comes earlier in the batch and clean when it comes later: an accident
    of the loop order); the candidate pool is fixed (``max_boxes``).

    Example:
        >>> views = SSLViews(seed=0)(torch.rand(2, 1, 32, 32, 32))
        >>> views["view1"].shape, views["rotation1"].shape
        (torch.Size([2, 1, 32, 32, 32]), torch.Size([2]))
    """

    def __init__(
        self,
        rotation_dims: Sequence[int] = (1, 2),
        max_masked_fraction: float = 0.3,
        box_size: Sequence[float] = (0.05, 0.25),
        max_boxes: int = 192,
        swap: bool = True,
        seed: int | None = None,
    ) -> None:
        if len(rotation_dims) != 2 or len(set(rotation_dims)) != 2 or not all(0 <= d < 3 for d in rotation_dims):
            raise ValueError(f"rotation_dims must be two different axes among 0, 1, 2; got {rotation_dims}.")
        if not 0 <= max_masked_fraction <= 1:
            raise ValueError(f"max_masked_fraction must lie in [0, 1], got {max_masked_fraction}.")
        if not 0 < box_size[0] <= box_size[1] <= 1:
            raise ValueError(f"box_size must satisfy 0 < min <= max <= 1, got {box_size}.")
        self.rotation_dims = tuple(d + 2 for d in rotation_dims)
        self.max_masked_fraction = float(max_masked_fraction)
        self.box_size = (float(box_size[0]), float(box_size[1]))
        self.max_boxes = int(max_boxes)
        self.swap = swap
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def reset(self) -> None:
        """Forget the generators: the next call starts again from ``seed`` (used for validation)."""
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self._generators[device] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[device]

    def rotate(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Rotate sample b of ``x`` by ``k[b] * 90`` degrees in the rotation plane: one gather, no host sync.

        The four in-plane permutations are ``torch.rot90`` of an index grid; each sample gathers
        through its own, so the result equals ``torch.rot90(x[b], k[b], plane)`` exactly.
        """
        a, b = self.rotation_dims
        n = x.shape[a]
        if x.shape[b] != n:
            raise ValueError(f"the rotation plane must be square, got sizes {x.shape[a]} and {x.shape[b]}.")
        grid = torch.arange(n * n, device=x.device).view(n, n)
        maps = torch.stack([torch.rot90(grid, r, dims=(0, 1)).reshape(-1) for r in range(4)])  # (4, n*n)
        moved = x.movedim((a, b), (-2, -1))
        flat = moved.reshape(*moved.shape[:-2], n * n)
        index = maps[k].view(x.shape[0], *[1] * (flat.ndim - 2), n * n).expand_as(flat)
        return torch.gather(flat, -1, index).view(moved.shape).movedim((-2, -1), (a, b))

    def draw_boxes(
        self, shape: Sequence[int], device: torch.device, gen: torch.Generator
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Candidate boxes of each sample and which to keep: ``(starts, ends, keep)``.

        ``starts``/``ends``: one ``(B, K)`` tensor per spatial axis (end exclusive); ``keep`` ``(B, K)``
        bool: boxes in order until their summed volume reaches U(0, max_masked_fraction) of the crop
        (the box that crosses the target is kept), so every kept row is a prefix. Edges, starts and
        clipping as the research code's ``patch_rand_drop`` (see the class docstring).
        """
        batch, spatial = shape[0], list(shape[2:])
        k = self.max_boxes
        target = torch.rand(batch, generator=gen, device=device) * self.max_masked_fraction
        volume = torch.ones(batch, k, device=device)
        starts, ends = [], []
        for size in spatial:
            lo, hi = self.edge_range(size)
            length = torch.randint(lo, hi, (batch, k), generator=gen, device=device)
            start = torch.randint(0, max(1, size - lo), (batch, k), generator=gen, device=device)
            end = (start + length).clamp_max(size)  # clipped at the border
            starts.append(start)
            ends.append(end)
            volume = volume * (end - start) / size
        keep = (volume.cumsum(1) - volume) < target[:, None]
        return starts, ends, keep

    def edge_range(self, size: int) -> tuple[int, int]:
        """Box edges along an axis of ``size`` voxels: ``[lo, hi)``, the research code's ``randint(tolr, max_block)``.

        >>> SSLViews().edge_range(96), SSLViews().edge_range(64)
        ((4, 24), (3, 16))
        """
        lo = max(1, int(self.box_size[0] * size))
        return lo, max(lo + 1, int(self.box_size[1] * size))

    def box_mask(self, shape: Sequence[int], device: torch.device, gen: torch.Generator) -> torch.Tensor:
        """Union of random boxes covering about U(0, max_masked_fraction) of each sample: ``(B, 1, X, Y, Z)`` bool.

        The boxes come from :meth:`draw_boxes`; :meth:`rasterise` paints them.
        """
        return self.rasterise(shape, *self.draw_boxes(shape, device, gen))

    @staticmethod
    def rasterise(
        shape: Sequence[int],
        starts: list[torch.Tensor],
        ends: list[torch.Tensor],
        keep: torch.Tensor,
        method: str = "auto",
    ) -> torch.Tensor:
        """Paint the kept boxes into a ``(B, 1, X, Y, Z)`` bool mask.

        On a GPU, a 3-D difference array: each kept box adds +-1 at its 8 corners, three cumulative
        sums turn that into per-voxel box counts; O(B * (K + X*Y*Z)) whatever the boxes, no host sync.
        On the CPU, where a host sync costs nothing and full-volume passes are what is slow, each kept
        box is a slice assignment (same mask; tested equal). ``method``: ``"auto"`` (by device),
        ``"difference"`` or ``"slices"``.
        """
        batch, spatial = shape[0], list(shape[2:])
        device = keep.device
        if method not in ("auto", "difference", "slices"):
            raise ValueError(f"method must be 'auto', 'difference' or 'slices', got {method!r}.")
        if method == "slices" or (method == "auto" and device.type == "cpu"):
            mask = torch.zeros(batch, 1, *spatial, dtype=torch.bool, device=device)
            s, e, kept = [t.tolist() for t in starts], [t.tolist() for t in ends], keep.sum(1).tolist()
            for b in range(batch):
                for j in range(kept[b]):
                    mask[b, 0, s[0][b][j] : e[0][b][j], s[1][b][j] : e[1][b][j], s[2][b][j] : e[2][b][j]] = True
            return mask
        k = keep.shape[1]
        keep = keep.float()
        padded = [s + 1 for s in spatial]
        diff = torch.zeros(batch * padded[0] * padded[1] * padded[2], device=device)
        b = torch.arange(batch, device=device)[:, None].expand(batch, k)
        for cx, cy, cz in itertools.product((0, 1), repeat=3):
            x = ends[0] if cx else starts[0]
            y = ends[1] if cy else starts[1]
            z = ends[2] if cz else starts[2]
            sign = -1.0 if (cx + cy + cz) % 2 else 1.0
            index = ((b * padded[0] + x) * padded[1] + y) * padded[2] + z
            diff.index_add_(0, index.reshape(-1), (sign * keep).reshape(-1))
        count = diff.view(batch, *padded).cumsum(1).cumsum(2).cumsum(3)
        return (count[:, : spatial[0], : spatial[1], : spatial[2]] > 0.5)[:, None]

    @staticmethod
    def box_ids(
        shape: Sequence[int],
        starts: list[torch.Tensor],
        ends: list[torch.Tensor],
        keep: torch.Tensor,
        method: str = "auto",
        chunk: int = 16,
    ) -> torch.Tensor:
        """Index of the last kept box covering each voxel, -1 where none: ``(B, 1, X, Y, Z)`` int16.

        Boxes are painted in order, later over earlier, as the research code paints them. On the CPU
        by slice assignment; on a GPU as the maximum box index over the boxes covering each voxel,
        ``chunk`` boxes at a time (no host sync). ``method``: ``"auto"`` (by device), ``"max"`` or
        ``"slices"`` (tested equal).
        """
        batch, spatial = shape[0], list(shape[2:])
        device = keep.device
        if method not in ("auto", "max", "slices"):
            raise ValueError(f"method must be 'auto', 'max' or 'slices', got {method!r}.")
        if method == "slices" or (method == "auto" and device.type == "cpu"):
            ids = torch.full((batch, 1, *spatial), -1, dtype=torch.int16, device=device)
            s, e, kept = [t.tolist() for t in starts], [t.tolist() for t in ends], keep.sum(1).tolist()
            for b in range(batch):
                for j in range(kept[b]):
                    ids[b, 0, s[0][b][j] : e[0][b][j], s[1][b][j] : e[1][b][j], s[2][b][j] : e[2][b][j]] = j
            return ids
        inside = [
            (torch.arange(n, device=device) >= a[..., None]) & (torch.arange(n, device=device) < z[..., None])
            for n, a, z in zip(spatial, starts, ends, strict=True)
        ]  # per axis (B, K, size)
        ids = torch.full((batch, *spatial), -1, dtype=torch.int16, device=device)
        none = torch.tensor(-1, dtype=torch.int16, device=device)
        for c0 in range(0, keep.shape[1], chunk):
            c = slice(c0, c0 + chunk)
            covered = (
                inside[0][:, c, :, None, None]
                & inside[1][:, c, None, :, None]
                & inside[2][:, c, None, None, :]
                & keep[:, c, None, None, None]
            )
            index = torch.arange(c0, c0 + covered.shape[1], dtype=torch.int16, device=device).view(1, -1, 1, 1, 1)
            ids = torch.maximum(ids, torch.where(covered, index, none).amax(1))
        return ids[:, None]

    @staticmethod
    def noise_fill(
        x: torch.Tensor, ids: torch.Tensor, gen: torch.Generator, num_boxes: int | None = None, method: str = "auto"
    ) -> torch.Tensor:
        """``x`` with the voxels of each box replaced by Gaussian noise min-max normalised to 0..1 per box.

        ``ids`` ``(B, 1, X, Y, Z)``: the box showing at each voxel, -1 for none (:meth:`box_ids`). Each
        box's noise is scaled by the min and max over its voxels (all channels), as the research
        code scales each box's noise. On a GPU the noise is drawn for the whole batch (no host sync);
        on the CPU only for the masked voxels (a sixth of the crop on average).

        Args:
            x: ``(B, C, X, Y, Z)`` images.
            ids: box index per voxel.
            gen: the generator to draw from.
            num_boxes: an upper bound of the box indices + 1 (``max_boxes``); None reads it from ``ids``.
            method: ``"auto"`` (by device), ``"dense"`` (the GPU's way) or ``"masked"`` (the CPU's).
        """
        if method not in ("auto", "dense", "masked"):
            raise ValueError(f"method must be 'auto', 'dense' or 'masked', got {method!r}.")
        batch = x.shape[0]
        num_boxes = int(ids.max()) + 1 if num_boxes is None else int(num_boxes)
        num_boxes = max(num_boxes, 1)
        tiny = torch.finfo(x.dtype).tiny
        if method == "masked" or (method == "auto" and x.device.type == "cpu"):  # noise for masked voxels only
            out = x.clone()
            for b in range(batch):
                m = ids[b, 0] >= 0
                box = ids[b, 0][m].long().expand(x.shape[1], -1)  # (C, n): every channel of a box is one group
                noise = torch.randn(box.shape, generator=gen, dtype=x.dtype)
                lo = torch.full((num_boxes,), float("inf"), dtype=x.dtype).scatter_reduce(
                    0, box[0], noise.amin(0), "amin"
                )
                hi = torch.full((num_boxes,), -float("inf"), dtype=x.dtype).scatter_reduce(
                    0, box[0], noise.amax(0), "amax"
                )
                out[b][:, m] = (noise - lo[box]) / (hi[box] - lo[box]).clamp_min(tiny)
            return out
        mask = (ids >= 0).expand_as(x)
        offset = torch.arange(batch, device=x.device).view(-1, *[1] * (x.ndim - 1)) * num_boxes
        group = (offset + ids.long().clamp_min(0)).expand_as(x)
        groups = batch * num_boxes
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        inf = torch.tensor(float("inf"), device=x.device, dtype=x.dtype)
        flat, flat_group = noise.reshape(-1), group.reshape(-1)
        lo = torch.full((groups,), float("inf"), device=x.device, dtype=x.dtype)
        lo = lo.scatter_reduce(0, flat_group, torch.where(mask.reshape(-1), flat, inf), "amin")
        hi = torch.full((groups,), -float("inf"), device=x.device, dtype=x.dtype)
        hi = hi.scatter_reduce(0, flat_group, torch.where(mask.reshape(-1), flat, -inf), "amax")
        lo, hi = lo[group], hi[group]
        return torch.where(mask, (noise - lo) / (hi - lo).clamp_min(tiny), x)

    def corrupt(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise boxes, then (optionally) boxes from a random partner. Returns (corrupted, mask, partner).

        ``partner`` ``(B,)``: uniform over the batch, the sample itself included; a sample that drew
        itself gets no swapped boxes (research code: ``idx_rnd = randint(0, img_n)``, skipped when
        ``idx_rnd == i``).
        """
        batch = x.shape[0]
        ids = self.box_ids(x.shape, *self.draw_boxes(x.shape, x.device, gen))
        mask = ids >= 0
        out = self.noise_fill(x, ids, gen, self.max_boxes)  # noise scaled to 0..1 like the images
        itself = torch.arange(batch, device=x.device)
        if not (self.swap and batch > 1):
            return out, mask, itself
        partner = torch.randint(0, batch, (batch,), generator=gen, device=x.device)
        swap_mask = self.box_mask(x.shape, x.device, gen) & (partner != itself).view(-1, 1, 1, 1, 1)
        out = torch.where(swap_mask, out[partner], out)
        return out, mask | swap_mask, partner

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"SSLViews expects (B, C, X, Y, Z), got shape {tuple(x.shape)}.")
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> Tensor: no metadata to track here
        gen = self.generator(x.device)
        out: dict[str, torch.Tensor] = {}
        for i in (1, 2):
            k = torch.randint(0, 4, (x.shape[0],), generator=gen, device=x.device)
            target = self.rotate(x, k)
            view, mask, partner = self.corrupt(target, gen)
            out.update({f"view{i}": view, f"target{i}": target, f"rotation{i}": k, f"mask{i}": mask})
            out[f"partner{i}"] = partner
        return out


def gather_with_local_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every DDP rank in rank order; gradients flow to this rank's part only.

    ``all_gather`` has no gradient, so the local slot is replaced by the local tensor itself. Needs the
    same shape on every rank (the bundles' SSL data loader drops the last incomplete batch).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


class SSLLoss(nn.Module):
    """``L = w_rot * CE(rotation) + w_con * NT-Xent(z1, z2) + w_rec * L1(reconstruction, rotated crop)``.

    ``forward(pred, target)`` takes the model's outputs for ``cat([view1, view2])`` (so the first half
    of each output is view 1) and ``target`` = ``{"rotation": (2B,), "reconstruction": (2B, C, ...)}``.
    Returns the total; the three unweighted terms of the last call are in ``self.terms``.

    Under DDP (``global_negatives``) the NT-Xent is computed on the embeddings of all ranks and its
    gradient is multiplied by the world size: DDP averages gradients over ranks, and the gathered loss
    already holds every rank's samples, so without the factor the contrastive gradient would be 1/W
    of the single-process one. Its value is unchanged.

    Example (two identical embeddings per view: NT-Xent = log(2N - 1)):
        >>> loss = SSLLoss(rotation_weight=0, reconstruction_weight=0)
        >>> pred = {"rotation": torch.zeros(4, 4), "contrastive": torch.ones(4, 8), "reconstruction": torch.zeros(4, 1, 2, 2, 2)}
        >>> target = {"rotation": torch.zeros(4, dtype=torch.long), "reconstruction": torch.zeros(4, 1, 2, 2, 2)}
        >>> round(loss(pred, target).item(), 4)
        1.0986
    """

    def __init__(
        self,
        rotation_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        temperature: float = 0.5,
        global_negatives: bool = True,
    ) -> None:
        super().__init__()
        self.weights = {
            "rotation": rotation_weight,
            "contrastive": contrastive_weight,
            "reconstruction": reconstruction_weight,
        }
        self.contrastive = ContrastiveLoss(temperature=temperature)
        self.global_negatives = global_negatives
        self.terms: dict[str, torch.Tensor] = {}

    def forward(self, pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
        rotation = F.cross_entropy(pred["rotation"].float(), target["rotation"])
        z1, z2 = pred["contrastive"].float().chunk(2)
        if self.global_negatives:
            z1, z2 = gather_with_local_grad(z1), gather_with_local_grad(z2)
        contrastive = self.contrastive(z1, z2)
        world = dist.get_world_size() if self.global_negatives and dist.is_available() and dist.is_initialized() else 1
        contrastive_for_grad = contrastive + (world - 1) * (contrastive - contrastive.detach())
        reconstruction = F.l1_loss(pred["reconstruction"].float(), target["reconstruction"].float())
        self.terms = {
            "rotation": rotation.detach(),
            "contrastive": contrastive.detach(),
            "reconstruction": reconstruction.detach(),
        }
        return (
            self.weights["rotation"] * rotation
            + self.weights["contrastive"] * contrastive_for_grad
            + self.weights["reconstruction"] * reconstruction
        )


def ssl_state_to_released(
    state: dict[str, torch.Tensor], legacy_merging: bool = False, recipe: dict | None = None
) -> dict[str, dict]:
    """An :class:`SSLHead` state_dict in the layout of the paper's released ``model_swinvit.pt``.

    Encoder tensors get the released names (``module.layers1.0.blocks.0.mlp.fc1.weight``, ...), so the
    file loads into the BTCV/MSD bundles' ``pretrained_path`` with every encoder tensor matched; the
    heads follow under ``module.`` (ignored there, and read back by :func:`released_to_ssl_state`).

    The file also records the patch-merging order the encoder was trained with, ``{"recipe":
    {"legacy_merging": ...}}`` beside ``"state_dict"`` (``custom.networks.recipe``): without it a file in this
    layout is taken for the paper's release, whose order is MONAI < 1.5's. ``SwinUNETR.load_from`` and
    ``torch.load(weights_only=True)`` read the file as before.

    Args:
        state: the :class:`SSLHead` state_dict.
        legacy_merging: the order the encoder merged patches in (False: MONAI's ``"merging"``, the
            SSL bundle's); recorded when no ``recipe`` is given (a recipe records the order it read from the network).
        recipe: the bundle's full recipe (``custom.networks.recipe.make_recipe``) to save instead of the order alone.
    """
    out = {}
    for key, value in state.items():
        new = monai_to_released_key(key) if key.startswith(ENCODER_PREFIX) else f"module.{key}"
        out[new] = value
    if recipe is None:
        recipe = {"format": RECIPE_FORMAT, "network": {"legacy_merging": bool(legacy_merging)}}
    return {"state_dict": out, "recipe": dict(recipe)}


def released_to_ssl_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`ssl_state_to_released`: a state_dict :class:`SSLHead` loads strictly."""
    state = checkpoint.get("state_dict", checkpoint)
    out = {}
    for key, value in state.items():
        encoder_key = released_to_monai_key(key)
        out[encoder_key if encoder_key is not None else key.removeprefix("module.")] = value
    return out


# -- inference ------------------------------------------------------------------------------------
# Added for the SSL bundle's configs/inference.json (a look at what pre-training learned). MONAI's
# inferers, ``verify_net_in_out`` and the TorchScript/ONNX exports need a network that returns one
# tensor; ``SSLHead`` returns a dict of its three heads. The subclass adds no parameter and keeps the
# state_dict keys of ``SSLHead``, so the bundle's ``model_swinvit.pt`` (through
# :func:`released_to_ssl_state`) loads into it strictly.
__all__ += ["SSLReconstruction"]


class SSLReconstruction(SSLHead):
    """:class:`SSLHead` returning only the reconstruction head's output ``(B, C, X, Y, Z)``.

    Same arguments as :class:`SSLHead`; every spatial size of the input must divide by 32. The two
    other heads still run (two linear layers on two tokens: negligible) so that this is exactly
    ``SSLHead(x)["reconstruction"]``.

    Example:
        >>> net = SSLReconstruction(feature_size=12).eval()
        >>> with torch.no_grad():
        ...     net(torch.rand(1, 1, 64, 64, 64)).shape
        torch.Size([1, 1, 64, 64, 64])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)["reconstruction"]
