"""Device profiles: what the benchmark stage runs the deliverable through (`configs/devices/<name>.yaml`).

A profile names the runtime whose numerics the deliverable's images and times come from
(`runtime`: ONNX Runtime with its execution providers, the QNN HTP backend, or ExecuTorch with
XNNPACK), caps intra-op threads, lists the ONNX Runtime execution providers wanted (the first one
the installed build has is used; the fallback is stated), and sets a memory budget that the
measured peak RSS is checked against. `emulated: true` marks a phone's runtime run on this
machine: its numerics, not its silicon, so its latencies are no phone's.

    profile = load_device_profile("snapdragon-htp")
    profile.check_deliverable("qnn")
    providers, missing = profile.resolve_providers()
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from toolchain.config import CONFIG_DIR, ConfigError, from_dict, read_yaml

DEFAULT_PROFILE = "desktop-cpu"
PROFILE_ENV = "COMPRESS_DEVICE_PROFILE"  # until RunConfig has benchmark.profile
# ONNX Runtime provider names a profile may ask for (an allow-list: a typo is an error, not a silent CPU run)
KNOWN_PROVIDERS = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "XnnpackExecutionProvider",
    "NnapiExecutionProvider",
    "QNNExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "OpenVINOExecutionProvider",
)


@dataclass(frozen=True)
class DeviceProfile:
    """One device the benchmark measures for; every key of the YAML is a field here."""

    description: str  # what device this imitates (shown in report.md)
    threads: int = 0  # intra-op threads for onnxruntime and torch; 0 = library default (all cores)
    memory_budget_bytes: int = 0  # peak RSS allowed for one model process; 0 = no budget
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])  # wanted, in order
    fallback_provider: str = "CPUExecutionProvider"  # what runs when none of `providers` is installed
    torch_device: Literal["cpu", "cuda"] = "cpu"  # where the PyTorch rows run
    emulated: bool = False  # true: a phone's runtime run on this machine (its numerics), not measured on the phone
    # what the deliverable's judged images and timed calls run through: ONNX Runtime (`providers`), the
    # QNN HTP backend (a --target qnn deliverable, every image; the x86 simulator here) or ExecuTorch's
    # runtime with XNNPACK (a --target executorch deliverable)
    runtime: Literal["onnxruntime", "qnn-htp", "executorch"] = "onnxruntime"
    name: str = ""  # set from the file name by the loader

    def __post_init__(self):
        if self.threads < 0:
            raise ConfigError(f"device profile {self.name}: threads={self.threads}: must be >= 0")
        if self.memory_budget_bytes < 0:
            raise ConfigError(
                f"device profile {self.name}: memory_budget_bytes={self.memory_budget_bytes}: must be >= 0 (0 = none)"
            )
        if not self.providers:
            raise ConfigError(f"device profile {self.name}: providers is empty; list at least CPUExecutionProvider")
        for provider in [*self.providers, self.fallback_provider]:
            if provider not in KNOWN_PROVIDERS:
                raise ConfigError(
                    f"device profile {self.name}: unknown execution provider {provider!r}; "
                    f"known: {', '.join(KNOWN_PROVIDERS)}"
                )

    def check_deliverable(self, kind: str) -> None:
        """ConfigError when this profile's runtime cannot run a deliverable of `kind` (its target)."""
        needs = {"qnn-htp": "qnn", "executorch": "executorch"}.get(self.runtime)
        if needs and kind != needs:
            raise ConfigError(
                f"device profile {self.name} runs the deliverable through {self.runtime}, which takes a "
                f"--target {needs} deliverable, not {kind}; pick another profile or --target {needs}"
            )

    def resolve_providers(self, available: list[str] | None = None) -> tuple[list[str], list[str]]:
        """(providers to pass to an InferenceSession, wanted providers this build lacks)."""
        if available is None:
            import onnxruntime as ort

            available = ort.get_available_providers()
        chosen = [p for p in self.providers if p in available]
        if self.fallback_provider not in chosen:
            chosen.append(self.fallback_provider)
        return chosen, [p for p in self.providers if p not in available]

    def to_report(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "threads": self.threads,
            "memory_budget_bytes": self.memory_budget_bytes,
            "providers": list(self.providers),
            "fallback_provider": self.fallback_provider,
            "emulated": self.emulated,
            "runtime": self.runtime,
        }


def profile_path(name_or_path: str) -> Path:
    """A shipped profile name (`snapdragon-htp`) or a path to a profile YAML."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"device profile {path}: no such file")
        return path
    shipped = CONFIG_DIR / "devices" / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "devices").glob("*.yaml")))
        raise ConfigError(f"unknown device profile {name_or_path!r}; shipped profiles: {names}, or pass a .yaml path")
    return shipped


def load_device_profile(name_or_path: str | None = None) -> DeviceProfile:
    """Load and validate a device profile; None = $COMPRESS_DEVICE_PROFILE, else desktop-cpu."""
    name_or_path = name_or_path or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    path = profile_path(name_or_path)
    data = read_yaml(path)
    if "name" in data:
        raise ConfigError(f"{path}: unknown key name; a profile is named by its file name")
    return from_dict(DeviceProfile, {**data, "name": path.stem}, path.stem)
