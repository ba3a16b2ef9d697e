"""What every phone layout shares: the files a converted folder keeps from its source (optimum's
layout around the graphs), the rows each component takes per call, and a guided UNet feed cut into
the pairs a fixed-shape UNet takes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


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


def guided_pairs(feed: dict[str, np.ndarray], rows: int = 2) -> list[dict[str, np.ndarray]]:
    """A guided feed of N prompts (N unconditional rows, then N conditional) as N feeds of `rows`
    rows each: (unconditional i, conditional i) for rows 2, the conditional row for rows 1."""
    n = len(feed["sample"]) // 2
    picks = [[i, n + i] if rows == 2 else [n + i] for i in range(n)]
    return [{k: (v[p] if np.ndim(v) >= 1 else v) for k, v in feed.items()} for p in picks]


def pairwise_unet_fn(session):
    """A fixed-shape UNet (any session with ONNX Runtime's surface: the QNN HTP backend's, an
    ExecuTorch program's) as a function of a guided feed of any number of prompts: one guided pair
    per call, the outputs back in the feed's order (what `export.guidance.guidance_fidelity` compares)."""
    from toolchain.runtime.ort import ort_feed

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        outputs = [np.asarray(session.run(None, ort_feed(session, p))[0], np.float32) for p in guided_pairs(feed)]
        return np.concatenate([o[:1] for o in outputs] + [o[1:] for o in outputs])

    return run
