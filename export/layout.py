"""The files a converted ONNX folder shares with its source: optimum's layout around the graphs."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_pipeline_files(src_dir: Path, out_dir: Path, ignore=None) -> None:
    """Copy tokenizer/, scheduler/, component configs, model_index.json and the graphs a converter
    leaves as they are from `src_dir` into `out_dir`; never the source's manifest.json (the stage
    writes its own) or dot-files (scratch). `ignore`: a `shutil.ignore_patterns` for component folders."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in src_dir.iterdir():
        if item.name.startswith(".") or item.name == "manifest.json":
            continue
        if item.is_dir():
            shutil.copytree(item, out_dir / item.name, dirs_exist_ok=True, ignore=ignore)
        else:
            shutil.copy2(item, out_dir / item.name)
