"""The QNN backend: ONNX Runtime sessions on Qualcomm's Hexagon NPU backend (HTP) through the
`onnxruntime-qnn` plugin execution provider. On x86_64 Linux the HTP backend is a simulator: the
NPU's own numerics (fixed-point kernels, fp16 where asked), at simulator speed, so a latency
measured here is the simulator's, never a phone's.

    session = htp_session(path, soc="SM8750", fp16=False)   # nothing falls back to the CPU

A node the HTP cannot take fails the session (`session.disable_cpu_ep_fallback`), so a model that
opens here runs on the NPU whole. `OrtPipeline(folder, open_session=htp_opener(...))` samples a
QNN folder through the one sampler like any ONNX Runtime folder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

# Snapdragon SoCs: QNN's soc_model id and the HTP architecture (Hexagon version) of each. fp16 on
# the HTP needs v73 or newer.
SOCS = {
    "SM8750": {"soc_model": "69", "htp_arch": "79", "name": "Snapdragon 8 Elite"},
    "SM8650": {"soc_model": "57", "htp_arch": "75", "name": "Snapdragon 8 Gen 3"},
    "SM8550": {"soc_model": "43", "htp_arch": "73", "name": "Snapdragon 8 Gen 2"},
}
DEFAULT_SOC = "SM8750"
EP_NAME = "QNNExecutionProvider"


class QnnUnavailable(RuntimeError):
    """onnxruntime-qnn is not installed (or its HTP backend did not register)."""


@functools.cache
def qnn_device():
    """The QNN execution provider's device, registered once per process."""
    try:
        import onnxruntime_qnn
    except ImportError as exc:
        raise QnnUnavailable("the qnn target needs onnxruntime-qnn: pip install 'diffusion-compress[qnn]'") from exc
    import onnxruntime as ort

    if not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise QnnUnavailable("onnxruntime-qnn is installed but registered no QNN device")
    return devices[0]


def provider_options(soc: str, fp16: bool) -> dict[str, str]:
    """The HTP backend's options for `soc`. Graph-input quantization stays on the NPU (the default
    hands it to the CPU, which fallback-free sessions refuse)."""
    if soc not in SOCS:
        raise ValueError(f"unknown SoC {soc!r}; choose one of {sorted(SOCS)}")
    options = {
        "backend_type": "htp",
        "offload_graph_io_quantization": "0",
        "soc_model": SOCS[soc]["soc_model"],
        "htp_arch": SOCS[soc]["htp_arch"],
    }
    if fp16:
        options["enable_htp_fp16_precision"] = "1"
    return options


def htp_session(path: Path, soc: str = DEFAULT_SOC, fp16: bool = False, context_file: Path | None = None):
    """An ONNX Runtime session of `path` on the HTP backend, every node on it. `context_file`: also
    write the compiled graph there as an EPContext model (what an app loads without compiling)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the plugin EP warns once per QDQ tensor it maps
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_file is not None:
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_file_path", str(context_file))
        options.add_session_config_entry("ep.context_embed_mode", "0")  # the binary beside, not inside
    options.add_provider_for_devices([qnn_device()], provider_options(soc, fp16))
    return ort.InferenceSession(str(path), sess_options=options)


def htp_opener(soc: str, fp16_components: set[str]) -> Callable[[Path, str], object]:
    """`OrtPipeline`'s `open_session(path, component)` for a QNN folder: HTP sessions, fp16
    precision for the components left unquantized."""

    def open_session(path: Path, component: str):
        return htp_session(path, soc, fp16=component in fp16_components)

    return open_session
