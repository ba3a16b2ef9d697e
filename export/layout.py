"""What every phone layout shares: the files a converted folder keeps from its source (optimum's
layout around the graphs) and the rows each component takes per call."""

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


def deploy_batches(generator: bool) -> dict[str, int]:
    """Rows per call of each fixed-shape component as the app feeds them: a guided pair per image
    (1 row for a k-step generator, which runs unguided), the VAE decoder one image."""
    pair = 1 if generator else 2
    return {"text_encoder": pair, "unet": pair, "vae_decoder": 1}
