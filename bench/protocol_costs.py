"""Costs of the protocol's added steps on this machine: post-processing, metrics, test-time mirroring.

- post-processing decision for one case (``LargestComponentTrial.add``: each class's Dice with and
  without its small components, MONAI's ``KeepLargestConnectedComponent`` on the class's bounding box)
  against the same scores with the component search over the whole map for each class (the baseline),
  on a synthetic 128^3 label map of 13 classes with islands: seconds and ratio;
- the inference transform (``KeepLargestComponentsd``, every class applied): seconds per 128^3 map;
- ``case_metrics`` (Dice, HD95, NSD of 13 classes): seconds per 128^3 case;
- mirroring: the ensemble predictor on one window with 1 and with 2 (``--swin``: a feature_size 12 Swin
  UNETR at 64^3) or 8 mirrorings (a tiny convolution network): the factor is the number of forward
  passes; a tiny network's figure says nothing about the real one's cost beyond that.

Run from the repository root: ``python -m bench.protocol_costs [--swin] [--repeats 3]``; writes
``bench/results/protocol_costs_cpu_<date>_<network>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_case(size: int = 128, classes: int = 13, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(prediction, label)``: ellipsoid organs; the prediction with shifted borders and small islands."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij")).astype(np.float32)
    label = np.zeros((size,) * 3, np.uint8)
    for c in range(1, classes + 1):
        centre = rng.uniform(0.2 * size, 0.8 * size, 3)
        radii = rng.uniform(0.04 * size, 0.15 * size, 3)
        inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
        label[inside] = c
    pred = np.roll(label, 1, axis=int(rng.integers(3)))
    for c in range(1, classes + 1):  # two islands per class, near the organ (within 12 voxels of its box)
        where = np.argwhere(label == c)
        lo, hi = np.maximum(where.min(0) - 12, 0), np.minimum(where.max(0) + 12, size - 3)
        for _ in range(2):
            x, y, z = (int(rng.integers(a, b)) for a, b in zip(lo, hi, strict=True))
            pred[x : x + 3, y : y + 3, z : z + 3] = c
    return pred, label


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--swin", action="store_true", help="time mirroring with a feature_size 12 Swin UNETR")
    args = parser.parse_args()

    from monai.transforms import KeepLargestConnectedComponentd

    from custom.inference.ensemble import EnsemblePredictor, tta_flips
    from custom.segmentation.metrics import case_metrics
    from custom.segmentation.postprocess import KeepLargestComponentsd, LargestComponentTrial, write_decision

    pred, label = synthetic_case()
    labels = list(range(1, 14))
    p1 = torch.as_tensor(pred[None])
    out: dict = {"device": "cpu", "threads": torch.get_num_threads(), "host": platform.node(), "map": [128, 128, 128]}

    def plain() -> None:  # the same Dice before and after, the component search over the whole map
        t1 = torch.as_tensor(label[None])
        for c in labels:
            pc, tc = p1 == c, t1 == c
            kept = KeepLargestConnectedComponentd("pred", applied_labels=[c], independent=True)({"pred": p1})["pred"]
            kept = torch.as_tensor(kept) == c
            _ = 2 * int((pc & tc).sum()) / (int(pc.sum()) + int(tc.sum()))
            _ = 2 * int((kept & tc).sum()) / (int(kept.sum()) + int(tc.sum()))

    out["decision_per_case_s"] = best_of(lambda: LargestComponentTrial(labels).add(pred, label), args.repeats)
    out["decision_plain_per_case_s"] = best_of(plain, args.repeats)
    out["decision_ratio_plain_over_ours"] = out["decision_plain_per_case_s"] / out["decision_per_case_s"]

    decision = LargestComponentTrial(labels)
    decision.add(pred, label)
    d = decision.decision()
    d["applied_labels"] = labels
    path = Path("/tmp/protocol_costs_decision.json")
    write_decision(d, path)
    transform = KeepLargestComponentsd("pred", path)
    out["inference_transform_13_classes_s"] = best_of(lambda: transform({"pred": p1}), args.repeats)
    out["case_metrics_13_classes_s"] = best_of(
        lambda: case_metrics(pred, label, labels, (0.8, 0.8, 2.5), 2.0), args.repeats
    )

    if args.swin:
        from monai.networks.nets import SwinUNETR

        net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12).eval()
        x, flips, name = torch.randn(1, 1, 64, 64, 64), tta_flips([[0]]), "swin_f12_64"
    else:
        net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 14, 1))
        x, flips, name = torch.randn(1, 1, 96, 96, 96), tta_flips(True), "tiny_conv_96"
    with torch.no_grad():
        one = best_of(lambda: EnsemblePredictor([net], "softmax")(x), args.repeats)
        many = best_of(lambda: EnsemblePredictor([net], "softmax", flips)(x), args.repeats)
    out["tta"] = {"network": name, "flips": len(flips), "one_s": one, "with_flips_s": many, "factor": many / one}

    out["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    target = results / f"protocol_costs_cpu_{out['date'][:10]}_{name}.json"
    target.write_text(json.dumps(out, indent=4) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=4))


if __name__ == "__main__":
    main()
