"""Disk cost of never hard-linking the input model, on the SD-1.5 architecture (random weights).

    python -m benchmarks.studies.run_disk_sd15 [--out benchmarks/results/run-disk-sd15.json]

A run shares the components a stage does not rewrite with its parent artifact. From the user's
model they are cloned (reflink) or copied, so no edit of a run's file can reach the input; between
compress's own sealed artifacts they stay hard links. This builds SD-1.5's text encoder (CLIP
ViT-L/14 text, 123M params) and VAE (83.7M) at fp32 as `save_pretrained` writes them, shares them
into a run folder the way the prune stage does (`link_pipeline(..., skip=("unet",))`), and
measures the bytes that took on disk and the time, once from the input (copy or reflink) and once
between two run artifacts (hard links). The UNet is rewritten by every model-changing stage, so
it costs the same either way and is not built here. Writes the JSON and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.studies.export_sd15 import cpu_model, library_versions

TEXT_ENCODER = dict(  # CLIP ViT-L/14 text tower, as in SD-1.5's text_encoder/config.json
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip
VAE = dict(  # SD-1.5's vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
)  # fmt: skip


def build_model(folder: Path) -> None:
    """The non-UNet part of an SD-1.5 pipeline folder, fp32 safetensors."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)).save_pretrained(folder / "text_encoder", safe_serialization=True)
    AutoencoderKL(**VAE).save_pretrained(folder / "vae", safe_serialization=True)
    from toolchain.models.io import EMBEDDED_MODEL as embedded

    for name in ("tokenizer", "scheduler", "model_index.json"):
        src = embedded / name
        shutil.copytree(src, folder / name) if src.is_dir() else shutil.copy2(src, folder / name)


def disk_bytes(folder: Path, seen: set[tuple[int, int]]) -> int:
    """Blocks allocated by files under `folder` not already counted in `seen` (hard links count once)."""
    total = 0
    for path in folder.rglob("*"):
        st = path.stat()
        if path.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def measure(work: Path) -> dict:
    from toolchain.models.io import RUN_MARKER, link_pipeline

    model, run = work / "model", work / "run"
    build_model(model)
    run.mkdir()
    (run / RUN_MARKER).write_text("{}")  # a run folder, as the runner marks it
    seen: set[tuple[int, int]] = set()
    input_bytes = disk_bytes(model, seen)
    rows = []
    for name, src, dst in (
        ("from the input model", model, run / "01-prune"),
        ("between run artifacts", run / "01-prune", run / "02-finetune"),
    ):
        start = time.perf_counter()
        link_pipeline(src, dst, skip=("unet",))
        rows.append(
            {"share": name, "seconds": round(time.perf_counter() - start, 2), "new_disk_bytes": disk_bytes(dst, seen)}
        )
    return {"input_bytes_without_unet": input_bytes, "rows": rows}


def render(result: dict) -> str:
    gib = 1024**3
    lines = [
        "# Disk cost of a run that never hard-links its input (SD-1.5 architecture)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpu']} ({result['machine']['cores']} cores), filesystem of the run folder: "
        f"{result['machine']['filesystem']}; versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        "",
        f"SD-1.5 text encoder + VAE + tokenizer + scheduler, fp32: {result['input_bytes_without_unet'] / gib:.2f} GiB.",
        "",
        "| shared | new disk | time |",
        "|---|---|---|",
    ]
    lines += [f"| {r['share']} | {r['new_disk_bytes'] / gib:.3f} GiB | {r['seconds']:.2f} s |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/run-disk-sd15.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.out.resolve().parent) as tmp:
        result = measure(Path(tmp))
        fs = os.popen(f"df -T {tmp} | tail -1").read().split()
    result = {
        "command": " ".join(
            ["python -m benchmarks.studies.run_disk_sd15", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "filesystem": fs[1] if len(fs) > 1 else "unknown"},
        "versions": library_versions(),
        **result,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
