"""Stage `concept_prune`: ConceptPrune, training-free erasure by zeroing skilled FFN weights.

Target prompts are each erased concept's `erase_prompts`, paired with its `anchor_prompt` as
the base prompt. The output is a diffusers folder: unchanged components are hard-linked from
the input; the UNet is re-saved (with its pruning record when the input was channel-pruned, so
it still rebuilds). The folder root gets `concept_prune_masks.safetensors` (one boolean mask
per `ff.net.2` weight, True = zeroed) and `concept_prune.json` (settings and counts): at the
root, not in unet/, because every `unet/*.safetensors` counts as UNet weights
(`component_params`, `check_pipeline_folder`).
"""

from __future__ import annotations

import json
import logging

from toolchain.artifact import Artifact, folder_size
from toolchain.config import ConceptPruneSettings, load_concept
from toolchain.models.io import PRUNING_RECORD, link_pipeline, load_pipeline, save_unet

logger = logging.getLogger(__name__)

MASKS_FILE = "concept_prune_masks.safetensors"
SUMMARY_FILE = "concept_prune.json"


def run(source: Artifact, settings: ConceptPruneSettings, ctx) -> Artifact:
    from safetensors.torch import save_file

    from toolchain.models.io import component_params
    from toolchain.pruning.concept_neurons import concept_prune, masks_to_tensors

    cfg, erase = settings.concept_prune, list(settings.erase)
    if not erase:
        raise ValueError("concept_prune needs at least one concept to erase; pass --erase CONCEPT")
    target_prompts, base_prompts = [], []
    for name in erase:
        concept = load_concept(name)
        target_prompts += concept.erase_prompts
        base_prompts += [concept.anchor_prompt] * len(concept.erase_prompts)  # "" (unconditional) if unset

    pipe = load_pipeline(source.files)
    record = concept_prune(
        pipe,
        target_prompts,
        base_prompts,
        skill_ratio=cfg.skill_ratio,
        timesteps=cfg.timesteps,
        steps=cfg.steps,
        seed=cfg.seed,
        guidance_scale=cfg.guidance_scale,
    )

    out = ctx.out_dir
    link_pipeline(source.files, out, skip=("unet", MASKS_FILE, SUMMARY_FILE))
    record_file = source.files / "unet" / PRUNING_RECORD
    pruning_record = json.loads(record_file.read_text()) if record_file.is_file() else None
    save_unet(pipe.unet, out / "unet", pruning_record)  # zeroing keeps every shape: the record still holds
    save_file(masks_to_tensors(record), out / MASKS_FILE)
    summary = {k: v for k, v in record.items() if k != "masks"}
    summary["erase"] = erase
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    logger.info(
        "concept_prune: zeroed %d of %d ff.net.2 weights for %s",
        record["zeroed_total"],
        record["ffn_weights_total"],
        ", ".join(erase),
    )
    return Artifact(
        path=out,
        kind="diffusers",
        records={
            "concept_prune": {
                k: summary[k]
                for k in (
                    "erase",
                    "skill_ratio",
                    "timesteps",
                    "steps",
                    "zeroed_total",
                    "ffn_weights_total",
                    "unet_params",
                )
            }
        },
        metrics={"params": component_params(out), "size_bytes": folder_size(out)},
    )
