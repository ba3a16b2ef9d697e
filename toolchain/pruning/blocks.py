"""Block removal of SD-1.x-style UNets: the BK-SDM presets (Kim et al., ECCV 2024).

BK-SDM removes whole residual+attention pairs and initialises the student from the teacher:
- `bk-base`: one resnet(+attention) pair per stage: layers_per_block 2 -> 1, so down stages
  keep their first pair and up stages keep pairs 0 and 2 of 3 (the last pair of an up stage is
  the one that takes the skip from the previous resolution, so its shapes match the student's
  last pair). U-Net 0.86B -> 0.58B params on SD-1.4.
- `bk-small`: base, and no mid block (0.49B).
- `bk-tiny`: small, and the innermost stages (DownBlock2D / UpBlock2D) removed as well; the
  student's up stage j is the teacher's up stage j+1 (0.33B).

The student is a stock `UNet2DConditionModel` config (diffusers supports `mid_block_type: null`),
so it is saved with `save_pretrained` and loads with `from_pretrained`; no pruning record is
needed to rebuild it. Its weights are the teacher's, copied by an explicit key mapping and
loaded with `strict=True`.
"""

from __future__ import annotations

import copy
import json
import logging
import re

from torch import nn

logger = logging.getLogger(__name__)

PRESETS = ("bk-base", "bk-small", "bk-tiny")
SD1X_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD1X_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
SD1X_MID = "UNetMidBlock2DCrossAttn"
# Config keys that may hold one value per down block (diffusers reverses them for the up blocks);
# bk-tiny drops the innermost (last) entry of each.
PER_BLOCK_KEYS = (
    "block_out_channels",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "reverse_transformer_layers_per_block",
    "only_cross_attention",
    "layers_per_block",
)


def _check_layout(config: dict, preset: str) -> None:
    """Refuse UNets the preset was not defined for, saying what it needs."""
    problems = []
    if tuple(config.get("down_block_types", ())) != SD1X_DOWN:
        problems.append(f"down_block_types {list(SD1X_DOWN)} (got {list(config.get('down_block_types', ()))})")
    if tuple(config.get("up_block_types", ())) != SD1X_UP:
        problems.append(f"up_block_types {list(SD1X_UP)} (got {list(config.get('up_block_types', ()))})")
    if config.get("mid_block_type", SD1X_MID) != SD1X_MID:
        problems.append(f"mid_block_type {SD1X_MID!r} (got {config.get('mid_block_type')!r})")
    layers = config.get("layers_per_block")
    if not (layers == 2 or (isinstance(layers, list) and all(n == 2 for n in layers))):
        problems.append(f"layers_per_block 2 (got {layers})")
    transformer_layers = config.get("transformer_layers_per_block", 1)
    if isinstance(transformer_layers, list) and any(isinstance(n, list) for n in transformer_layers):
        problems.append("a transformer_layers_per_block without nested lists (SDXL-style layouts are not supported)")
    if problems:
        raise ValueError(
            f"{preset}: needs an SD-1.x/2.x UNet layout: "
            + "; ".join(problems)
            + ". Use method 'channels' for other UNets."
        )


def student_config(base_config: dict, preset: str) -> dict:
    """The stock UNet2DConditionModel config of the BK-SDM student of `base_config`."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: unknown; choose one of {list(PRESETS)}")
    _check_layout(base_config, preset)
    config = {k: copy.deepcopy(v) for k, v in base_config.items() if not k.startswith("_")}
    config["layers_per_block"] = 1  # up stages get layers_per_block + 1 = 2 (from 3)
    if preset in ("bk-small", "bk-tiny"):
        config["mid_block_type"] = None
    if preset == "bk-tiny":
        config["down_block_types"] = list(SD1X_DOWN[:3])
        config["up_block_types"] = list(SD1X_UP[1:])
        for key in PER_BLOCK_KEYS:
            if isinstance(config.get(key), (list, tuple)):
                config[key] = list(config[key])[:3]
    return config


def _teacher_key(student_key: str, preset: str) -> str:
    """Which teacher tensor initialises a student tensor (BK-SDM's copy rule).

    Down stages and everything outside the stages keep their names (the student's single pair
    is the teacher's first). Up stages: student pair 1 <- teacher pair 2; for bk-tiny the
    student's up stage j is the teacher's up stage j + 1.
    """
    match = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", student_key)
    if match is None:
        return student_key
    stage, part, index, rest = int(match[1]), match[2], int(match[3]), match[4]
    if preset == "bk-tiny":
        stage += 1
    if part in ("resnets", "attentions") and index == 1:
        index = 2
    return f"up_blocks.{stage}.{part}.{index}.{rest}"


def _module_prefix(key: str) -> str:
    """`up_blocks.1.resnets.1.conv1.weight` -> `up_blocks.1.resnets.1.`, `mid_block.resnets.0.conv1.weight`
    -> `mid_block.resnets.0.`, `conv_in.weight` -> `conv_in.`"""
    parts = key.split(".")
    depth = {"down_blocks": 4, "up_blocks": 4, "mid_block": 3}.get(parts[0], 1)
    return ".".join(parts[:depth]) + "."


def remove_unet_blocks(unet: nn.Module, preset: str) -> tuple[nn.Module, dict]:
    """Build the BK-SDM student of `unet` (left unchanged) initialised from its weights.

    Returns (student, record); the record is JSON-safe: method, base_config, student_config,
    mapping {student key prefix: teacher key prefix} (every student tensor is the teacher's
    tensor under the mapped name), params_before, params_after, removed (teacher prefixes that
    initialise nothing). Student outputs keep the teacher's shape (B, out_channels, H, W).
    """
    from diffusers import UNet2DConditionModel

    base_config = json.loads(unet.to_json_string())
    config = student_config(base_config, preset)
    param = next(unet.parameters())
    student = UNet2DConditionModel.from_config(config).to(param.device)
    if param.dtype != next(student.parameters()).dtype:
        student = student.to(dtype=param.dtype)

    teacher_state = unet.state_dict()
    mapped, mapping = {}, {}
    for key, tensor in student.state_dict().items():
        source = _teacher_key(key, preset)
        if source not in teacher_state or teacher_state[source].shape != tensor.shape:
            raise ValueError(
                f"{preset}: student tensor {key} {list(tensor.shape)} has no teacher tensor {source} of that "
                "shape; the teacher's layout does not fit the preset"
            )
        mapped[key] = teacher_state[source].detach().clone()
        mapping[_module_prefix(key)] = _module_prefix(source)
    student.load_state_dict(mapped, strict=True)
    student.train(unet.training)

    used = set(mapping.values())
    removed = sorted({_module_prefix(k) for k in teacher_state} - used)
    params_before = sum(p.numel() for p in unet.parameters())
    params_after = sum(p.numel() for p in student.parameters())
    logger.info("%s: UNet %d -> %d params (%d modules removed)", preset, params_before, params_after, len(removed))
    return student, {
        "method": preset,
        "base_config": base_config,
        "student_config": json.loads(student.to_json_string()),
        "mapping": mapping,
        "removed": removed,
        "params_before": params_before,
        "params_after": params_after,
    }
