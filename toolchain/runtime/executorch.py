"""The ExecuTorch backend: `.pte` programs run through ExecuTorch's own runtime (`executorch.runtime`),
with the XNNPACK delegate's kernels (here on x86: what Android and iOS CPUs run, not their timing).

A program is opened as an `ExecuTorchSession`, which answers ONNX Runtime's session surface
(`get_inputs`, `get_providers`, `run`), so `toolchain.runtime.ort.OrtPipeline(folder, files,
open_session=executorch_opener())` samples an ExecuTorch folder through the one sampler, as every
other runtime does. A `.pte` knows its inputs' shapes and dtypes but not their names: they are
the ONNX layout's (`INPUTS`), in that order, as `export.executorch` writes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROVIDER = "ExecuTorch XNNPACK (on x86)"
INPUTS = {
    "text_encoder": ("input_ids",),
    "unet": ("sample", "timestep", "encoder_hidden_states"),
    "vae_decoder": ("latent_sample",),
}
# ExecuTorch's ScalarType codes -> ONNX Runtime's type strings (what ort_feed casts by)
_TYPES = {6: "tensor(float)", 5: "tensor(float16)", 4: "tensor(int64)", 3: "tensor(int32)"}


class ExecuTorchUnavailable(RuntimeError):
    """ExecuTorch is not installed: a missing extra, bad input for --target executorch."""


def require_executorch() -> None:
    """Raise ExecuTorchUnavailable, naming the extra, where ExecuTorch cannot be imported."""
    try:
        _quiet_torchao()
        import executorch.runtime  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError as exc:
        raise ExecuTorchUnavailable(
            f"--target executorch needs ExecuTorch ({exc.name or exc}): pip install 'diffusion-compress[executorch]'"
        ) from exc


def _quiet_torchao() -> None:
    """torchao logs every CUDA kernel library it cannot load on a CPU build, at import: not our user's news."""
    logging.getLogger("torchao").setLevel(logging.ERROR)


@dataclass(frozen=True)
class _Input:
    """An input as ONNX Runtime's NodeArg describes it."""

    name: str
    shape: list[int]
    type: str


class ExecuTorchSession:
    """The `forward` method of one `.pte` behind ONNX Runtime's session surface. Every input has the
    fixed shape it was exported with; a one-element input (a feed's scalar timestep) is broadcast to it."""

    def __init__(self, path: Path, component: str):
        from executorch.runtime import Runtime

        _quiet_torchao()
        self.path = Path(path)
        self.method = Runtime.get().load_program(str(self.path)).load_method("forward")
        meta = self.method.metadata
        names = INPUTS.get(component) or tuple(f"input_{i}" for i in range(meta.num_inputs()))
        if len(names) != meta.num_inputs():
            raise ValueError(f"{path}: {meta.num_inputs()} inputs, a {component} takes {len(names)}")
        infos = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
        self.inputs = [
            _Input(n, list(i.sizes()), _TYPES.get(i.dtype(), "tensor(float)"))
            for n, i in zip(names, infos, strict=True)
        ]

    def get_inputs(self) -> list[_Input]:
        return self.inputs

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def run(self, output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """All outputs as float32 / int arrays (`output_names` is ignored: a program's outputs are positional)."""
        import torch

        tensors = []
        for spec in self.inputs:
            value = np.asarray(feed[spec.name])
            if value.shape != tuple(spec.shape) and value.size == 1:
                value = np.full(spec.shape, value.reshape(-1)[0], dtype=value.dtype)
            tensors.append(torch.from_numpy(np.ascontiguousarray(value)))
        return [np.asarray(out.detach().numpy()) for out in self.method.execute(tensors)]


def executorch_opener() -> Callable[[Path, str], ExecuTorchSession]:
    """`OrtPipeline(open_session=...)`: every component's `.pte` through ExecuTorch's runtime."""
    require_executorch()
    return ExecuTorchSession
