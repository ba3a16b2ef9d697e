"""Convert an exported fp32 ONNX folder to fp16 weights and compute, each component checked against fp32.

    result = convert_onnx_folder_fp16(onnx_dir, out_dir)

Output: the same optimum layout (tokenizer/, scheduler/, configs, model_index.json copied);
every `<component>/model.onnx` rewritten by `onnxruntime.transformers.float16` with
keep_io_types=True, so graph inputs and outputs stay float32 and an app (or
`toolchain.runtime.ort.ort_generator`) feeds the folder exactly like the fp32 one. Half the bytes.

Ops without an fp16 kernel: ONNX Runtime's CPU provider runs them in fp32 itself (its
InsertCastTransformer wraps them in Casts at session creation), which this build does for every
op the SD components use. If a session still refuses a node ("Could not find an implementation
for OP"), that op type is added to the converter's block list (kept fp32 in the file) and the
conversion retried; the op types kept this way are reported. onnxconverter-common is not
installed; onnxruntime's own copy of its converter is used.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# fp16 has an 11-bit significand (relative rounding 4.9e-4), so an fp16 graph cannot meet the
# fp32 exporter's 1e-4 limits. The gate is Apple's ml-stable-diffusion rule for fp16 Core ML
# components, PSNR >= 35 dB against the fp32 reference on the same inputs, plus a max-abs
# limit ~10x above what fp16 rounding gives on the tiny and digits models (measured
# 1e-3..1e-2 on O(1) outputs), so a wrong op (errors of order 1) still fails loudly.
FP16_PSNR_FLOOR_DB = 35.0
FP16_TOLERANCES = {"text_encoder": 5e-2, "unet": 5e-2, "vae_decoder": 5e-2, "vae_encoder": 5e-2}
PARITY_BATCH = 2
_MISSING_KERNEL = re.compile(r"implementation for (\w+)\(")


def convert_onnx_folder_fp16(
    src_dir: Path,
    out_dir: Path,
    components=None,
    op_block_list: list[str] | None = None,
    tolerances: dict[str, float] | None = None,
    psnr_floor_db: float = FP16_PSNR_FLOOR_DB,
    progress: bool = True,
) -> dict:
    """Write fp16 versions of `components` (default: every `<component>/model.onnx` in `src_dir`).

    op_block_list: op types to keep in fp32 in the file, on top of those ORT CPU refuses.
    Returns::

        {"parity": [{"component": "unet", "format": "onnx-fp16", "reference": "onnx-fp32",
                     "max_abs_err": 2e-3, "psnr_db": 62.0, "tolerance": 5e-2, "psnr_floor_db": 35.0}],
         "files": {"unet": {"path": "unet/model.onnx", "size_bytes": ..., "fp32_size_bytes": ...,
                            "fp32_op_types": [], "convert_s": 1.2}}}

    Raises ValueError on bad arguments, export.validate.ParityError when a component's error
    passes its tolerance or its PSNR falls below the floor.
    """
    from tqdm.auto import tqdm

    from export.layout import copy_pipeline_files
    from export.quantize import onnx_pair_parity
    from toolchain.runtime.ort import component_inputs

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    available = sorted(p.parent.name for p in src_dir.glob("*/model.onnx"))
    components = (
        available if components is None else ([components] if isinstance(components, str) else list(components))
    )
    missing = [c for c in components if c not in available]
    if missing or not components:
        raise ValueError(f"components {components}: {src_dir} has ONNX models for {available} only")
    limits = dict(FP16_TOLERANCES)
    limits.update(tolerances or {})
    if src_dir.resolve() == out_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the source folder; conversion never modifies its input")

    copy_pipeline_files(src_dir, out_dir)
    result: dict[str, Any] = {"parity": [], "files": {}}
    for name in tqdm(components, desc="convert fp16", unit="component", disable=not progress):
        start = time.perf_counter()
        src = src_dir / name / "model.onnx"
        target = out_dir / name / "model.onnx"
        external = (src.with_name("model.onnx_data")).is_file()
        blocked = _write_fp16(name, src, target, external, list(op_block_list or []))
        convert_s = time.perf_counter() - start
        inputs = component_inputs(src_dir, name, batch=PARITY_BATCH)
        max_abs_err, psnr_db = onnx_pair_parity(src, target, inputs)
        tolerance = limits.get(name, 5e-2)
        logger.info("%s: fp16 max abs err %.3g (tolerance %.3g), PSNR %.1f dB", name, max_abs_err, tolerance, psnr_db)
        result["parity"].append(
            {
                "component": name,
                "format": "onnx-fp16",
                "reference": "onnx-fp32",
                "max_abs_err": max_abs_err,
                "psnr_db": psnr_db,
                "tolerance": tolerance,
                "psnr_floor_db": psnr_floor_db,
            }
        )
        size = target.stat().st_size + (target.with_name("model.onnx_data").stat().st_size if external else 0)
        result["files"][name] = {
            "path": f"{name}/model.onnx",
            "size_bytes": size,
            "fp32_size_bytes": src.stat().st_size
            + (src.with_name("model.onnx_data").stat().st_size if external else 0),
            "fp32_op_types": sorted(set(blocked)),
            "convert_s": round(convert_s, 3),
        }
        _check_fp16_parity(name, max_abs_err, psnr_db, tolerance, psnr_floor_db)
    return result


def _write_fp16(name: str, src: Path, target: Path, external: bool, blocked: list[str]) -> list[str]:
    """Convert `src` to fp16 at `target` until ORT CPU opens it; returns the op types kept fp32
    (`blocked`, grown by each op type ORT refuses)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    for _ in range(64):  # one retry per op type ORT refuses; a UNet has a few dozen op types
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=blocked or None)
        for stale in (target, target.with_name("model.onnx_data")):
            stale.unlink(missing_ok=True)
        onnx.save_model(
            model,
            str(target),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location="model.onnx_data",
        )
        del model
        try:
            ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
            break
        except Exception as exc:  # ORT raises its own Fail/NotImplemented types
            op = _MISSING_KERNEL.search(str(exc))
            if not op or op.group(1) in blocked:
                raise
            logger.info("%s: ORT CPU has no fp16 %s kernel; keeping it fp32", name, op.group(1))
            blocked.append(op.group(1))
    return blocked


def _check_fp16_parity(name: str, max_abs_err: float, psnr_db: float, tolerance: float, psnr_floor_db: float) -> None:
    from export.validate import ParityError

    if not max_abs_err <= tolerance:
        raise ParityError(
            f"{name}: fp16 differs from the fp32 ONNX model by max abs error {max_abs_err:.3g}, "
            f"over the tolerance {tolerance:.3g}; keep the offending op types fp32 (op_block_list)"
        )
    if not psnr_db >= psnr_floor_db:
        raise ParityError(
            f"{name}: fp16 vs fp32 ONNX PSNR {psnr_db:.1f} dB, below the floor {psnr_floor_db:.0f} dB "
            f"(max abs error {max_abs_err:.3g})"
        )
