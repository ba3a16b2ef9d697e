"""Stage `prune`: structural pruning of the UNet, by channels or by whole blocks.

The output is a diffusers folder: the unchanged components are hard-linked from the input.
- method "channels" (Diff-Pruning style, torch-pruning): the UNet is saved as safetensors plus
  the pruning record that rebuilds it (`models.rebuild`), since its widths are no stock config.
- methods "bk-base" / "bk-small" / "bk-tiny" (BK-SDM block removal): the student is a stock
  UNet2DConditionModel config initialised from the teacher's weights, so it is saved with
  `save_pretrained` and needs no pruning record; the block mapping goes into the manifest.
The pruned UNet is not fine-tuned here: both papers recover quality with distillation.
"""

from __future__ import annotations

import json
import logging

from toolchain.artifact import Artifact, folder_size
from toolchain.config import PruneConfig
from toolchain.models.io import link_pipeline, load_unet, save_unet

logger = logging.getLogger(__name__)


def _taylor_calibration(source: Artifact, cfg: PruneConfig) -> dict:
    """Keyword arguments of `accumulate_taylor_gradients`: the text condition of
    `cfg.taylor_prompts` and the pipeline's own training noise schedule."""
    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(source.files / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(
        source.files / "text_encoder", use_safetensors=True, local_files_only=True
    ).eval()
    tokens = tokenizer(
        list(cfg.taylor_prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        encoder_hidden_states = text_encoder(tokens.input_ids)[0]
    config = json.loads((source.files / "scheduler" / "scheduler_config.json").read_text())
    return {
        "encoder_hidden_states": encoder_hidden_states,
        "noise_scheduler": DDPMScheduler.from_config(config),
        "steps": cfg.taylor_steps,
        "stop": cfg.taylor_stop,
        "batch": cfg.taylor_batch,
        "seed": cfg.seed,
    }


def run(source: Artifact, cfg: PruneConfig, ctx) -> Artifact:
    from toolchain.models.io import component_params

    unet = load_unet(source.files / "unet")
    if cfg.method == "channels":
        from toolchain.pruning.channels import prune_unet_channels

        taylor = _taylor_calibration(source, cfg) if cfg.importance == "taylor" else None
        if taylor is not None:
            taylor["progress"] = ctx.progress
        record = prune_unet_channels(
            unet,
            ratio=cfg.ratio,
            importance=cfg.importance,
            global_pruning=cfg.global_pruning,
            block_ratios=cfg.block_ratios,
            taylor=taylor,
        )
        summary = {
            k: record[k]
            for k in (
                "method",
                "ratio",
                "importance",
                "global_pruning",
                "block_ratios",
                "params_before",
                "params_after",
            )
        }
        if record["taylor"] is not None:
            summary["taylor"] = record["taylor"]
    else:
        from toolchain.pruning.blocks import remove_unet_blocks

        unet, record = remove_unet_blocks(unet, cfg.method)
        summary = {k: record[k] for k in ("method", "mapping", "removed", "params_before", "params_after")}
    logger.info("prune: UNet %d -> %d params (%s)", record["params_before"], record["params_after"], cfg.method)

    out = ctx.out_dir
    link_pipeline(source.files, out, skip=("unet",))
    # A block-removed student is a stock config: save_pretrained, no pruning record.
    save_unet(unet, out / "unet", record if cfg.method == "channels" else None)
    return Artifact(
        path=out,
        kind="diffusers",
        records={"pruning": summary},
        metrics={"params": component_params(out), "size_bytes": folder_size(out)},
    )
