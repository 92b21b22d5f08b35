"""ONNX Runtime for CPU inference, as a drop-in for the network inside MONAI's sliding window.

MONAI exports bundles to ONNX (``monai.bundle onnx_export``) but has no inferer that runs the
exported graph; ``SlidingWindowInferer`` calls whatever callable it is given on each batch of
windows. :class:`OnnxRuntimePredictor` is such a callable: at its first call (after the evaluator's
``CheckpointLoader`` has put the weights into the network) it exports the network to ONNX in memory
and opens an ONNX Runtime session; every call then runs the windows through it. On this project's
2-core CPU, Swin UNETR (f12, 64^3 windows, SDPA attention) ran 1.61x faster than eager PyTorch with
logits within 1.5e-5 (``bench/cpu_runtimes.py``, ``docs/benchmarks.md``).

The bundles switch it on with ``onnx_runtime`` in ``configs/inference.json`` through
:func:`cpu_predictor`; ``onnxruntime`` is an optional package.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Sequence

import torch

from custom.utils import require_bool

__all__ = ["OnnxRuntimePredictor", "cpu_predictor"]

logger = logging.getLogger(__name__)


class OnnxRuntimePredictor(torch.nn.Module):
    """``network``'s forward at a fixed window size, run by ONNX Runtime on the CPU.

    Args:
        network: the PyTorch network; its weights at the first call are the ones exported (load
            them before inference starts, as the bundles' ``CheckpointLoader`` does).
        roi_size: the spatial size of every input (the sliding window's ``roi_size``).
        in_channels: input channels of the network.
        threads: ONNX Runtime intra-op threads; default: ``torch.get_num_threads()``.
        opset: ONNX opset for the export.

    Raises:
        ImportError: ``onnxruntime`` is not installed.

    Example:
        >>> from monai.networks.nets import SwinUNETR
        >>> net = SwinUNETR(1, 2, feature_size=12).eval()
        >>> predictor = OnnxRuntimePredictor(net, (64, 64, 64))
        >>> predictor(torch.zeros(3, 1, 64, 64, 64)).shape
        torch.Size([3, 2, 64, 64, 64])
    """

    def __init__(
        self,
        network: torch.nn.Module,
        roi_size: Sequence[int],
        in_channels: int = 1,
        threads: int | None = None,
        opset: int = 17,
    ) -> None:
        super().__init__()
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "onnx_runtime is true but the onnxruntime package is not installed: "
                "`pip install onnxruntime`, or run with --onnx_runtime False."
            ) from e
        self.network = network
        self.roi_size = tuple(int(s) for s in roi_size)
        self.in_channels = in_channels
        self.threads = threads
        self.opset = opset
        self._session = None

    def _open_session(self):
        import onnxruntime as ort

        start = time.perf_counter()
        buffer = io.BytesIO()
        training = self.network.training
        self.network.eval()
        # batch 2, not 1: a batch of one can be folded into constants by the tracer
        example = torch.zeros(2, self.in_channels, *self.roi_size, device=next(self.network.parameters()).device)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about shapes taken as constants: the window size is fixed
            torch.onnx.export(
                self.network,
                (example,),
                buffer,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=self.opset,
                dynamo=False,
            )
        self.network.train(training)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        logger.info(
            f"windows of {self.roi_size} run by ONNX Runtime {ort.__version__} on the CPU "
            f"(network exported and session opened in {time.perf_counter() - start:.1f} s)"
        )
        return session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"onnx_runtime runs on the CPU, but the input is on {x.device}: set --onnx_runtime False.")
        if tuple(x.shape[2:]) != self.roi_size:
            raise ValueError(f"expected windows of {self.roi_size}, got {tuple(x.shape[2:])}.")
        if self._session is None:
            self._session = self._open_session()
        out = self._session.run(None, {"image": x.detach().float().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def cpu_predictor(
    network: torch.nn.Module, onnx_runtime: bool, roi_size: Sequence[int], in_channels: int = 1
) -> torch.nn.Module:
    """The network itself, or, with ``onnx_runtime``, an :class:`OnnxRuntimePredictor` around it.

    Raises:
        TypeError: ``onnx_runtime`` is not a bool (``--onnx_runtime false`` arrives as a string).
        ValueError: ``onnx_runtime`` with a network on a GPU.
    """
    if not require_bool(onnx_runtime, "onnx_runtime"):
        return network
    device = next(network.parameters()).device
    if device.type != "cpu":
        raise ValueError(
            f"onnx_runtime is for CPU inference, but the network is on {device}: set --onnx_runtime False."
        )
    return OnnxRuntimePredictor(network, roi_size, in_channels)
