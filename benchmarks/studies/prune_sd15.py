"""Params, MACs and CPU latency of pruned SD-1.5 UNets (random weights, real shapes).

    python -m benchmarks.studies.prune_sd15 [--repeats N] [--threads N] [--out benchmarks/results/prune-sd15.json]

Variants: unpruned, channels 0.3 and 0.5 (magnitude importance), bk-small, bk-tiny (BK-SDM). Each
is measured on one UNet forward at batch 2 (one image with classifier-free guidance): sample
(2, 4, 64, 64), timestep (2,), encoder_hidden_states (2, 77, 768), in PyTorch (CPU, inference
mode) and in ONNX Runtime (CPUExecutionProvider; TorchScript exporter, dynamo=False, weights as
external data since SD-1.5 passes 2 GB). Ratios are against the unpruned model of the same run.
MACs are per image (one latent; the batch-2 forward costs twice that), counted over conv/linear/
norm layers with torch-pruning's `count_ops_and_params`; the attention matmuls inside
scaled_dot_product_attention are not counted. Weights are random: the numbers
say what the shapes cost, not how good a model is. Writes the JSON and a Markdown table beside
it, both naming the machine, library versions and command. `--config` takes another UNet config
(e.g. a small SD-1.x-layout one to try the script).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("unpruned", "channels-0.3", "channels-0.5", "bk-small", "bk-tiny")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import torch_pruning

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_pruning": torch_pruning.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def make_unet(config: str, variant: str, seed: int):
    """The variant's UNet (eval mode) built from the config with random weights."""
    from toolchain.models.architectures import build_unet_from_config

    unet = build_unet_from_config(config, seed=seed)
    if variant == "unpruned":
        return unet
    if variant.startswith("channels-"):
        from toolchain.pruning.channels import prune_unet_channels

        prune_unet_channels(unet, ratio=float(variant.split("-", 1)[1]), importance="magnitude")
        return unet.eval()
    from toolchain.pruning.blocks import remove_unet_blocks

    student, _ = remove_unet_blocks(unet, variant)
    del unet
    return student.eval()


def measure(unet, inputs: dict[str, np.ndarray], args, workdir: Path) -> dict:
    import torch
    import torch_pruning as tp

    from benchmarks.latency import ort_latency, torch_unet_latency
    from toolchain.runtime.ort import ort_session

    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    row: dict = {"params": sum(p.numel() for p in unet.parameters())}
    with torch.no_grad():  # positional inputs: torch-pruning divides by the batch -> MACs per image
        macs, _ = tp.utils.count_ops_and_params(
            unet, (tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"])
        )
    row["macs"] = int(macs)
    row["torch"] = torch_unet_latency(unet, inputs, args.warmup, args.repeats)
    if args.no_onnx:
        return row
    onnx_path = workdir / "unet.onnx"
    start = time.perf_counter()
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            unet,
            (tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"]),
            str(onnx_path),
            input_names=["sample", "timestep", "encoder_hidden_states"],
            output_names=["out_sample"],
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,  # >2 GB models get their weights as external files beside unet.onnx
        )
    row["onnx_export_s"] = round(time.perf_counter() - start, 1)
    session, provider = ort_session(onnx_path, threads=args.threads)
    row["ort"] = ort_latency(session, inputs, args.warmup, args.repeats)
    row["ort_provider"] = provider
    del session
    return row


def to_markdown(result: dict) -> str:
    lines = [
        f"# UNet pruning benchmark: {result['config']}",
        "",
        f"- machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['threads']} threads",
        f"- inputs: {result['inputs']}",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- command: `{result['command']}`",
        f"- warmup {result['warmup']}, repeats {result['repeats']}; latency = median ms of one UNet forward",
        "",
        "| variant | params (M) | x | GMACs/image | x | torch ms | x | ORT ms | x |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["variants"].items():
        r = row["ratios"]

        def cell(value, ratio):
            return ("-" if value is None else f"{value:.4g}", "-" if ratio is None else f"{ratio:.2f}")

        cells = [
            *cell(row["params"] / 1e6, r.get("params")),
            *cell(row["macs"] / 1e9, r.get("macs")),
            *cell(row.get("torch", {}).get("median_ms"), r.get("torch_ms")),
            *cell(row.get("ort", {}).get("median_ms"), r.get("ort_ms")),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sd15", help="UNet config: sd15, sd21-base or a .json path")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the config's sample_size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=77, help="text tokens")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch and ORT intra-op threads (0: library default)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prune-sd15.json"))
    args = parser.parse_args(argv)

    import torch

    from toolchain.models.architectures import resolve_unet_config

    if args.threads:
        torch.set_num_threads(args.threads)
    config_path = resolve_unet_config(args.config)
    config = json.loads(config_path.read_text())
    side = args.latent or config["sample_size"]
    cross_dim = config["cross_attention_dim"]
    rng = np.random.default_rng(args.seed)
    inputs = {
        "sample": rng.standard_normal((args.batch, config["in_channels"], side, side)).astype(np.float32),
        "timestep": np.full((args.batch,), 500, dtype=np.int64),
        "encoder_hidden_states": rng.standard_normal((args.batch, args.seq, cross_dim)).astype(np.float32),
    }
    result = {
        "config": str(config_path.name),
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads()},
        "versions": library_versions(),
        "command": "python -m benchmarks.studies.prune_sd15 " + " ".join(argv if argv is not None else sys.argv[1:]),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "variants": {},
    }
    started = time.perf_counter()
    for variant in args.variants:
        t0 = time.perf_counter()
        unet = make_unet(str(config_path), variant, args.seed)
        build_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix=f"prune-bench-{variant}-") as workdir:
            row = measure(unet, inputs, args, Path(workdir))
        row["build_s"] = round(build_s, 1)
        row["total_s"] = round(time.perf_counter() - t0, 1)
        result["variants"][variant] = row
        del unet
        gc.collect()  # one SD-1.5 UNet (3.4 GB fp32) at a time
        print(
            f"{variant}: {row['params'] / 1e6:.1f} M params, {row['macs'] / 1e9:.1f} GMACs, "
            f"torch {row['torch']['median_ms']:.0f} ms"
            + (f", ORT {row['ort']['median_ms']:.0f} ms" if "ort" in row else "")
            + f" ({row['total_s']:.0f} s)",
            flush=True,
        )

    base = result["variants"].get("unpruned")
    for row in result["variants"].values():
        ratios = {}
        if base is not None:
            ratios["params"] = row["params"] / base["params"]
            ratios["macs"] = row["macs"] / base["macs"]
            ratios["torch_ms"] = row["torch"]["median_ms"] / base["torch"]["median_ms"]
            if "ort" in row and "ort" in base:
                ratios["ort_ms"] = row["ort"]["median_ms"] / base["ort"]["median_ms"]
        row["ratios"] = {k: round(v, 4) for k, v in ratios.items()}
    result["wall_s"] = round(time.perf_counter() - started, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = to_markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
