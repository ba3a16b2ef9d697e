"""`compress validate FILE`: check a recipe, target profile, concept file or device profile by
its folder, without loading a model. Apart from `toolchain.config` so that config does not import
the device profiles (which build on config)."""

from __future__ import annotations

from pathlib import Path

from toolchain.config import ConceptConfig, RunConfig, deep_merge, from_dict, load_concept, read_yaml
from toolchain.device_config import load_device_profile


def validate_file(path: Path) -> str:
    """Validate a recipe, target profile or concept file by its folder; returns its kind."""
    data = read_yaml(path)
    kind = path.parent.name
    if kind == "recipes":
        cfg = from_dict(RunConfig, data)
        for name in cfg.erase:
            load_concept(name)
    elif kind == "targets":
        from_dict(RunConfig, deep_merge({"target": path.stem}, data))
    elif kind == "concepts":
        from_dict(ConceptConfig, data, path.stem)
    elif kind == "devices":
        load_device_profile(str(path))
    else:
        from_dict(RunConfig, data)
        kind = "recipes"
    return kind
