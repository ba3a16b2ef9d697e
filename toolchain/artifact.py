"""Artifacts: a folder plus `manifest.json`, sealed atomically.

A stage writes into `NN-name.partial/`; `seal` writes the manifest last and renames the folder,
so a crash leaves only `.partial` folders and a sealed folder is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"


@dataclass
class Artifact:
    """A stage's output. `model_path` is where the model files are: the folder itself, except
    for the source artifact, which points at the user's model instead of copying it."""

    path: Path
    kind: str  # diffusers | onnx | ort | coreml | report
    stage: str = ""
    fingerprint: str = ""
    parent: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    model_path: Path | None = None

    @property
    def files(self) -> Path:
        return self.model_path or self.path

    def to_manifest(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "parent": self.parent,
            "config": self.config,
            "records": self.records,
            "metrics": self.metrics,
            "versions": self.versions,
            "model_path": str(self.model_path) if self.model_path else None,
        }


def load(path: Path) -> Artifact:
    """Read a sealed artifact; a folder without a manifest is not one."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST}; not a sealed artifact")
    data = json.loads(manifest_file.read_text())
    model_path = Path(data.pop("model_path")) if data.get("model_path") else None
    data.pop("model_path", None)
    return Artifact(path=path, model_path=model_path, **data)


def fingerprint(parent: str | None, stage: str, version: int, config: dict[str, Any]) -> str:
    """Hash of what determines a stage's output: its input, its code version and its config."""
    payload = json.dumps(
        {"parent": parent, "stage": stage, "version": version, "config": config}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def hash_folder(path: Path) -> str:
    """Content hash of every file under `path` (names and bytes), for the source model."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def seal(artifact: Artifact, final: Path) -> Artifact:
    """Write the manifest last, then rename `<final>.partial` to `<final>` in one step."""
    partial = artifact.path
    write_json_atomic(partial / MANIFEST, artifact.to_manifest())
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    artifact.path = final
    return artifact
