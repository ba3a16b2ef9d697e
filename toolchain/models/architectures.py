"""Real UNet architectures with random weights, from the committed configs in configs/models/.

For measuring pruning, export and latency at real shapes offline: no registry ships Stable
Diffusion weights, and the shapes, not the values, set params, MACs and latency.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def resolve_unet_config(name_or_path: str | Path) -> Path:
    """`sd15` / `sd21-base` (a file stem in configs/models, `-unet` optional) or a JSON path."""
    path = Path(name_or_path)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such UNet config file")
        return path
    for stem in (str(name_or_path), f"{name_or_path}-unet"):
        candidate = MODEL_CONFIG_DIR / f"{stem}.json"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
    raise FileNotFoundError(f"UNet config {name_or_path!r}: not a .json file nor one of {known}")


def build_unet_from_config(path: str | Path, seed: int = 0, device: str | None = None):
    """A UNet2DConditionModel of the config at `path` (or a name, see `resolve_unet_config`),
    randomly initialised under `seed`, in eval mode. device="meta" builds it without memory
    (enough to count parameters)."""
    import torch
    from diffusers import UNet2DConditionModel

    config = json.loads(resolve_unet_config(path).read_text())
    if device == "meta":
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config).eval()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config).eval()
    return unet.to(device) if device else unet
