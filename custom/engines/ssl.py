"""Ignite engines for self-supervised pre-training, built on MONAI's supervised ones.

MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` already do the device moves, AMP with a
gradient scaler, gradient accumulation, ``torch.compile`` and the iteration events the stock handlers
listen to. SSL differs only in where inputs and targets come from: two corrupted views made from each
batch on the device (:class:`custom.networks.ssl.SSLViews`), with rotation labels and uncorrupted crops as
targets. So the engines here only swap in :class:`SSLBatch` as ``prepare_batch`` and put the three
loss terms into the iteration output (``loss_rotation``, ``loss_contrastive``, ``loss_reconstruction``)
for the loggers. Output keys are MONAI's ``CommonKeys``: ``image`` (the views), ``label`` (targets),
``pred`` (the model's dict), ``loss``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from custom.networks.ssl import SSLViews

__all__ = ["SSLBatch", "SSLTrainer", "SSLEvaluator"]


class SSLBatch:
    """``prepare_batch`` for SSL: image to device, then ``(cat([view1, view2]), targets)``.

    targets: ``{"rotation": cat([k1, k2]), "reconstruction": cat([target1, target2])}``.
    """

    def __init__(self, views: SSLViews, image_key: str = CommonKeys.IMAGE) -> None:
        self.views = views
        self.image_key = image_key

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = batchdata[self.image_key]
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        v = self.views(image.to(device=device, non_blocking=non_blocking, **kwargs))
        inputs = torch.cat([v["view1"], v["view2"]])
        targets = {
            "rotation": torch.cat([v["rotation1"], v["rotation2"]]),
            "reconstruction": torch.cat([v["target1"], v["target2"]]),
        }
        return inputs, targets


def _copy_loss_terms(engine: Any) -> None:
    """Put the loss function's unweighted terms into the iteration output, as floats for the loggers."""
    for name, value in getattr(engine.loss_function, "terms", {}).items():
        engine.state.output[f"loss_{name}"] = value


class SSLTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose batches become SSL views on the device.

    Args:
        views: the :class:`custom.networks.ssl.SSLViews` that makes the inputs and targets.
        loss_function: a :class:`custom.networks.ssl.SSLLoss` (its ``terms`` are logged).
        kwargs: everything else as for ``SupervisedTrainer`` (``decollate`` is off: the outputs are
            dicts of whole-batch tensors, not per-sample items).
    """

    def __init__(self, *args: Any, views: SSLViews, **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(*args, prepare_batch=SSLBatch(views), **kwargs)
        loader = self.data_loader
        if hasattr(loader, "__len__") and len(loader) == 0:
            n = len(loader.dataset) if hasattr(loader, "dataset") else "?"
            raise ValueError(
                f"the training data loader yields no batch: {n} volume(s), batch_size {loader.batch_size}, and the "
                "last incomplete batch is dropped (global negatives need equal batches). Lower --batch_size or add volumes."
            )
        self.add_event_handler(IterationEvents.LOSS_COMPLETED, _copy_loss_terms)


class SSLEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` on SSL views made with a fixed seed, re-started at every validation,
    so the validation metric (reconstruction L1 on held-out crops) compares like with like.

    Args:
        views: an :class:`custom.networks.ssl.SSLViews` with a ``seed``.
        kwargs: everything else as for ``SupervisedEvaluator``.

    Raises:
        ValueError: ``views`` has no seed.
    """

    def __init__(self, *args: Any, views: SSLViews, **kwargs: Any) -> None:
        if views.seed is None:
            raise ValueError(
                "SSLEvaluator needs views with a fixed seed, so that every validation sees the same views."
            )
        kwargs.setdefault("decollate", False)
        super().__init__(*args, prepare_batch=SSLBatch(views), **kwargs)
        from ignite.engine import Events

        self.add_event_handler(Events.EPOCH_STARTED, lambda _: views.reset())
