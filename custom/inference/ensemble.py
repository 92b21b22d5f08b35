"""Average the probabilities of several networks and of mirrored inputs, per sliding window.

The leaderboard protocol of the paper (cross-validated models ensembled, test-time mirroring; the
authors' answers in research-contributions #69, #132) as one callable that MONAI's
``SlidingWindowInferer`` uses as its ``network``: each window goes through every model and every
mirroring, the probabilities are averaged on the window's device, and the windows are stitched as
usual, so a case is preprocessed once and inverted once whatever the number of models and flips.

Why not ``monai.transforms.MeanEnsemble``: it averages a list of finished outputs, which keeps
``models x flips`` full-volume outputs in memory (40 for 5 folds x 8 flips); here a running sum keeps one
window's output. Flips are ``torch.flip``, exact and their own inverse (no interpolation).

**Output: log-probabilities** (the choice that keeps the bundles' post-processing as it is):

- softmax task: ``log(mean_k softmax(z_k))``. ``softmax`` of it is the averaged probability, so the
  usual ``Activationsd(softmax=True)`` then ``AsDiscreted(argmax=True)`` gives the ensemble's decision
  for one model and many. For one model without flips, stitching ``log_softmax(z)`` instead of ``z``
  changes every channel of a voxel by the same amount, so after the softmax the result is the plain
  model's, to float rounding.
- sigmoid task (BraTS regions): ``logit(mean_k sigmoid(z_k))``. ``sigmoid`` of it is the averaged
  probability, so ``Activationsd(sigmoid=True)`` then ``AsDiscreted(threshold=0.5)`` stays correct; for
  one model without flips it is ``z`` itself (clamped at ``|z| <= 16.6`` by the float32 eps guard,
  which changes no threshold decision).

Do not feed the outputs to a loss that expects raw logits, and never apply ``softmax`` to probabilities
(``output="probabilities"`` gives them, for callers that then threshold or argmax directly: a second
softmax keeps the argmax but a sigmoid of probabilities is always >= 0.5, which breaks a threshold).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from custom.networks.weight_files import CheckpointError, read_weights, state_mismatch

__all__ = ["ALL_FLIPS", "tta_flips", "EnsemblePredictor", "load_ensemble", "ensemble_predictor"]

logger = logging.getLogger(__name__)

#: every subset of the three spatial axes, the identity first (8 mirrorings)
ALL_FLIPS: list[tuple[int, ...]] = [c for r in range(4) for c in itertools.combinations(range(3), r)]

_EPS = 1e-7  # float32: keeps log and logit finite where a probability rounds to 0 or 1


def tta_flips(tta: bool | Sequence[Sequence[int]] | None) -> list[tuple[int, ...]]:
    """The mirrorings of a ``tta`` setting: False/None -> ``[()]``, True -> all 8, a list -> those plus ``()``.

    Axes are the spatial axes 0, 1, 2 of ``(B, C, X, Y, Z)``; the original (no flip) is always averaged in.

    >>> tta_flips(False), len(tta_flips(True)), tta_flips([[0], [1, 2]])
    ([()], 8, [(), (0,), (1, 2)])

    Raises:
        ValueError: not a bool, None or list of axis lists; an axis outside 0..2 or repeated
            (``--tta true`` arrives as the string "true": write ``--tta True``).
    """
    if tta is None or tta is False:
        return [()]
    if tta is True:
        return list(ALL_FLIPS)
    if isinstance(tta, (str, bytes)) or not isinstance(tta, Sequence):
        raise ValueError(f"tta must be False, True or a list of axis tuples such as [[0], [1, 2]], got {tta!r}")
    flips: list[tuple[int, ...]] = [()]
    for axes in tta:
        if isinstance(axes, (int, str)) or not isinstance(axes, Sequence):
            raise ValueError(f"tta: each entry is a list of spatial axes (0, 1, 2), got {axes!r} in {tta!r}")
        t = tuple(sorted(axes))
        if any(isinstance(a, bool) or a not in (0, 1, 2) for a in t) or len(set(t)) != len(t):
            raise ValueError(f"tta: axes must be distinct values of 0, 1, 2, got {list(axes)!r}")
        if t not in flips:
            flips.append(t)
    return flips


class EnsemblePredictor(torch.nn.Module):
    """``network`` for a sliding-window inferer: the mean probability of ``networks`` x ``flips``, as logs.

    Args:
        networks: the models (same input and output channels), in eval mode for inference.
        activation: ``"softmax"`` (exclusive classes) or ``"sigmoid"`` (overlapping regions).
        flips: mirrorings over the spatial axes (:func:`tta_flips`); ``[()]`` = no mirroring.
        output: ``"log"`` (default, see the module docstring) or ``"probabilities"``.

    Shapes: input ``(B, C_in, X, Y, Z)``, output ``(B, C_out, X, Y, Z)``, float32.

    Raises:
        ValueError: no networks, unknown activation or output, bad flips.

    >>> import torch
    >>> net = torch.nn.Conv3d(1, 3, 1)
    >>> ens = EnsemblePredictor([net], "softmax", tta_flips(True))
    >>> x = torch.rand(1, 1, 4, 4, 4)
    >>> bool(torch.allclose(ens(x).softmax(1), net(x).softmax(1), atol=1e-6))  # a 1x1x1 conv is mirror-symmetric
    True
    """

    def __init__(
        self,
        networks: Sequence[torch.nn.Module],
        activation: str = "softmax",
        flips: Sequence[Sequence[int]] = ((),),
        output: str = "log",
    ) -> None:
        super().__init__()
        if not networks:
            raise ValueError("EnsemblePredictor needs at least one network")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        if output not in ("log", "probabilities"):
            raise ValueError(f"output must be 'log' or 'probabilities', got {output!r}")
        self.networks = torch.nn.ModuleList(networks)
        self.activation = activation
        self.flips = tta_flips([list(f) for f in flips])
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for net in self.networks:
            for axes in self.flips:
                dims = [a + 2 for a in axes]
                y = net(torch.flip(x, dims) if dims else x)
                if isinstance(y, (list, tuple)):  # deep supervision: the full-resolution head
                    y = y[0]
                y = y.float()
                p = torch.softmax(y, 1) if self.activation == "softmax" else torch.sigmoid(y)
                if dims:
                    p = torch.flip(p, dims)
                total = p if total is None else total + p
        mean = total / (len(self.networks) * len(self.flips))
        if self.output == "probabilities":
            return mean
        mean = mean.clamp(_EPS, 1.0 - _EPS) if self.activation == "sigmoid" else mean.clamp_min(_EPS)
        return torch.log(mean) if self.activation == "softmax" else torch.logit(mean)


def load_ensemble(
    network: torch.nn.Module,
    files: Sequence[str | os.PathLike],
    activation: str = "softmax",
    tta: bool | Sequence[Sequence[int]] | None = False,
    device: str | torch.device | None = None,
) -> EnsemblePredictor:
    """One copy of ``network`` per weight file, loaded (strict), in eval mode, wrapped in an ensemble.

    Args:
        network: the bundle's ``network_def`` (its weights are not used; each file fills a copy).
        files: ``model.pt`` files (a plain state_dict or ``{"model": state_dict, ...}``), e.g. the folds'
            ``@ckpt_dir/fold_<F>/model.pt``.
        activation: see :class:`EnsemblePredictor`.
        tta: see :func:`tta_flips`.
        device: where the copies go (``@device``); None leaves them where ``network`` is.

    Raises:
        ValueError: no files.
        custom.networks.weight_files.CheckpointError: a file missing, damaged, or not fitting ``network``;
            the message names it.
    """
    if isinstance(files, (str, bytes, os.PathLike)) or not isinstance(files, Sequence) or not files:
        raise ValueError(
            f"ensemble must be a list of weight files, e.g. --ensemble \"['models/fold_0/model.pt', "
            f"'models/fold_1/model.pt']\", or None (the one model.pt); got {files!r}"
        )
    networks = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise CheckpointError(f"{path}: no trained weights there (listed in ensemble); train that fold first")
        saved = read_weights(path)
        state = saved.get("model", saved)
        net = copy.deepcopy(network)
        try:
            net.load_state_dict(state, strict=True)
        except (RuntimeError, ValueError, KeyError, TypeError):
            raise CheckpointError(
                state_mismatch(path, "model", net, state, "or list weights trained with these settings")
            ) from None
        networks.append(net.to(device) if device is not None else net)
    flips = tta_flips(tta)
    logger.info(
        f"ensemble of {len(networks)} weight files ({', '.join(map(str, files))}), {len(flips)} mirroring(s) each"
    )
    return EnsemblePredictor(networks, activation, flips).eval()


def ensemble_predictor(
    network: torch.nn.Module,
    ensemble: Sequence[str | os.PathLike] | None = None,
    tta: bool | Sequence[Sequence[int]] | None = False,
    activation: str = "softmax",
    device: str | torch.device | None = None,
    predictor: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """The ``network`` an inference or evaluation config hands its inferer, from its ``ensemble`` and ``tta``.

    - neither set (the default): ``predictor`` (or ``network``) itself, untouched: MONAI Label and every
      existing command see the plain model, its logits and its ``model.pt`` loading;
    - ``tta`` only: ``predictor`` (or ``network``) wrapped, the same module, so weights a handler loads
      into ``network`` later (``Events.STARTED``) are the ones used;
    - ``ensemble`` set: one copy of ``network`` per file, loaded here (:func:`load_ensemble`); the
      config's own ``model.pt`` loader must then be disabled. ``predictor`` is not used.

    Args:
        network: the PyTorch network (``@network``), copied for an ensemble.
        ensemble, tta, activation, device: see :func:`load_ensemble` and :func:`tta_flips`.
        predictor: what runs the one model when there is no ensemble (``@predictor``: the network itself,
            or its ONNX Runtime wrapper); None: ``network``.

    Raises:
        ValueError: see :func:`tta_flips`, :func:`load_ensemble`.
    """
    flips = tta_flips(tta)
    if ensemble is None:
        single = predictor if predictor is not None else network
        return single if flips == [()] else EnsemblePredictor([single], activation, flips).eval()
    return load_ensemble(network, ensemble, activation, tta, device)
