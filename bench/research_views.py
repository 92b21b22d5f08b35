"""SSL views made the research code's way: the baseline the SSL benchmarks compare ``SSLViews`` with.

Our own code, written to the recipe of the paper's research scripts: for each sample a Python loop
draws a rotation and rotates it, then draws boxes one at a time with Python's ``random`` until their
summed volume reaches U(0, 0.3) of the crop (edges ``[int(0.05 s), int(0.25 s))``, clipped at the
border, as ``patch_rand_drop`` draws them), filling each with min-max normalised Gaussian noise made
on the device, then does the same for boxes swapped in from a random sample (none when it draws
itself), in place; each box's size is read back to the host, as per-box bookkeeping does. Same outputs (keys, shapes, dtypes) as
:class:`custom.networks.ssl.SSLViews`, so the SSL engines take either (``bench/zoo_recipe/ssl_train.json``).
"""

from __future__ import annotations

import random

import torch

__all__ = ["ResearchViews", "loop_views"]


def loop_views(
    x: torch.Tensor, max_fraction: float = 0.3, box=(0.05, 0.25), rng: random.Random | None = None
) -> dict[str, torch.Tensor]:
    """Two views of every crop of ``x`` ``(B, C, X, Y, Z)``: per-sample loops, one box at a time."""
    rng = rng or random.Random()

    def drop(sample: torch.Tensor, mask: torch.Tensor, source: torch.Tensor | None) -> None:
        _, h, w, d = sample.shape
        target = rng.uniform(0, max_fraction) * h * w * d
        covered = 0
        while covered < target:
            # edges in [int(0.05 s), int(0.25 s)), first voxel in [0, s - int(0.05 s)), clipped at the border
            lows = [max(1, int(box[0] * s)) for s in (h, w, d)]
            starts = [rng.randrange(0, max(1, s - lo)) for s, lo in zip((h, w, d), lows, strict=True)]
            ends = [
                min(a + rng.randrange(lo, max(lo + 1, int(box[1] * s))), s)
                for a, lo, s in zip(starts, lows, (h, w, d), strict=True)
            ]
            sizes = [z - a for a, z in zip(starts, ends, strict=True)]
            region = (slice(None), *(slice(a, z) for a, z in zip(starts, ends, strict=True)))
            if source is None:
                noise = torch.randn((sample.shape[0], *sizes), device=sample.device)
                sample[region] = (noise - noise.min()) / (noise.max() - noise.min())
            else:
                sample[region] = source[region]
            mask[region] = True
            covered += int(torch.tensor(sizes).prod().item())  # host round trip, as per-box bookkeeping does

    out = {}
    for v in (1, 2):
        rotated, labels = [], []
        for i in range(x.shape[0]):
            k = rng.randint(0, 3)
            rotated.append(torch.rot90(x[i], k, dims=(2, 3)))
            labels.append(k)
        target = torch.stack(rotated)
        view = target.clone()
        mask = torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=torch.bool, device=x.device)
        for i in range(x.shape[0]):
            drop(view[i], mask[i], None)
            j = rng.randint(0, x.shape[0] - 1)
            if j != i:
                drop(view[i], mask[i], view[j])
        out.update({f"view{v}": view, f"target{v}": target, f"mask{v}": mask})
        out[f"rotation{v}"] = torch.tensor(labels, device=x.device)
    return out


class ResearchViews:
    """Callable like :class:`custom.networks.ssl.SSLViews` (``seed``, ``reset()``), views from :func:`loop_views`."""

    def __init__(self, seed: int | None = 0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)

    def reset(self) -> None:
        self.rng = random.Random(self.seed)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return loop_views(x, rng=self.rng)
