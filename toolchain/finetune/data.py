"""What the finetune loops train on: the checked concepts, the retain and forget prompts, the
teacher's own samples of them (cached), real image+caption folders, and the seeded batches.

Every batch is drawn from a generator seeded by (seed, step, stream), so a run resumed from a
checkpoint draws exactly the batches an uninterrupted one draws.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from toolchain.config import CONFIG_DIR, ConceptConfig, ConfigError, FinetuneConfig, load_concept
from toolchain.unlearning import OBJECTIVE_LATENTS, get_objective

logger = logging.getLogger(__name__)

SAMPLES_FILE = "teacher_samples.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------------------------
# Concepts and prompts


def check_config(cfg: FinetuneConfig, erase: list[str]) -> list[ConceptConfig]:
    """Refuse settings no run can honour, before any model is loaded; returns the concepts."""
    get_objective(cfg.objective)
    if cfg.unlearns and not erase:
        raise ConfigError(
            f"finetune.mode={cfg.mode} unlearns a concept but nothing is erased; pass --erase CONCEPT "
            "or use finetune.mode=distill (mode=sfd: finetune.sfd.forget_weight=0 forgets nothing)"
        )
    concepts = [load_concept(name) for name in erase]
    for concept in concepts:
        if not concept.erase_prompts:
            raise ConfigError(f"concept {concept.name}: erase_prompts is empty; list the prompts that name it")
    return concepts


def retain_prompt_list(cfg: FinetuneConfig, concepts: list[ConceptConfig]) -> list[str]:
    """`cfg.retain_prompts`, or the erase prompts of every concept file of the same judge that is
    not erased (digits world: every other digit) and the erased concepts' own `retain_prompts`."""
    if cfg.retain_prompts:
        return list(cfg.retain_prompts)
    judges = {c.judge for c in concepts} or {cfg.retain_judge}
    erased = {(c.judge, c.label) for c in concepts}
    prompts: list[str] = []
    for path in sorted((CONFIG_DIR / "concepts").glob("*.yaml")):
        concept = load_concept(str(path))
        if concept.judge in judges and (concept.judge, concept.label) not in erased:
            prompts += [p for p in concept.erase_prompts if p not in prompts]
    for concept in concepts:
        for more in concept.retain_prompts.values():
            prompts += [p for p in more if p not in prompts]
    if not prompts:
        raise ConfigError(
            f"finetune: no retain prompts (no other concept of judge {sorted(judges)}); "
            "set finetune.retain_prompts=[...]"
        )
    return prompts


@dataclass
class Examples:
    """What a run learns from, known before any model is loaded.

    retain: retain prompts (empty with `retain_data`); forget: (forget prompt, anchor prompt) pairs
    whose x_0 the teacher samples; retain_images: (image, caption); forget_images: (image, forget
    prompt, anchor prompt), from a concept's `images` folder."""

    retain: list[str]
    forget: list[tuple[str, str]]
    retain_images: list[tuple[Path, str]]
    forget_images: list[tuple[Path, str, str]]


def training_examples(cfg: FinetuneConfig, erase: list[str]) -> Examples:
    """The checked concepts' prompts and image folders: `retain_data` replaces the retain prompts,
    a concept's `images` replace the teacher's samples of it."""
    concepts = check_config(cfg, erase)
    retain_images = read_image_folder(Path(cfg.retain_data)) if cfg.retain_data else []
    retain = [] if retain_images else retain_prompt_list(cfg, concepts)
    forget, forget_images = [], []
    for concept in concepts if cfg.unlearns else []:
        if concept.images:
            pairs = read_image_folder(Path(concept.images), concept.erase_prompts)
            forget_images += [(image, text, concept.anchor_prompt) for image, text in pairs]
        else:
            forget += [(p, concept.anchor_prompt) for p in concept.erase_prompts]
    return Examples(retain, forget, retain_images, forget_images)


# ----------------------------------------------------------------------------------------------
# Training data: teacher samples, images and prompt embeddings


@dataclass
class TrainingData:
    """Everything a step samples from. S samples, P prompts (prompt 0 is "").

    latents (S, C, h, w): teacher samples in the UNet's latent space; emb (P, L, D);
    retain_rows / retain_pids (N_r,): sample row and prompt id of each retain example;
    forget_rows / forget_pids / anchor_pids / anchor_rows (N_f,): a forget example's sample row,
    prompt, its concept's anchor prompt and a sample row of that anchor prompt; ids (P, L): the
    prompts' token ids (the robust option attacks them; None where the prompts are unknown).
    """

    latents: torch.Tensor
    emb: torch.Tensor
    retain_rows: torch.Tensor
    retain_pids: torch.Tensor
    forget_rows: torch.Tensor
    forget_pids: torch.Tensor
    anchor_pids: torch.Tensor
    anchor_rows: torch.Tensor
    ids: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in vars(self).items() if v is not None}


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """(P, L, D) text embeddings of `prompts` (padded to the tokenizer's max length)."""
    out = []
    for start in range(0, len(prompts), 64):
        tokens = pipe.tokenizer(
            prompts[start : start + 64],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            out.append(pipe.text_encoder(tokens.input_ids.to(pipe.device))[0].float().cpu())
    return torch.cat(out)


def read_image_folder(folder: Path, captions: list[str] | None = None) -> list[tuple[Path, str]]:
    """(image, caption) pairs of an image+caption folder, in file-name order.

    Captions come from Hugging Face's `imagefolder` layout (`metadata.jsonl` lines with
    `file_name` and `text`), else from `name.txt` beside `name.png`, else from `captions` in turn
    (concept images: the concept's erase prompts). An image left without a caption is refused.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"image folder {folder}: no such directory")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigError(f"image folder {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    texts: dict[Path, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    texts[(folder / row["file_name"]).resolve()] = str(row["text"])
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(f"{metadata}:{number}: each line must be JSON with file_name and text") from None
    pairs = []
    for i, image in enumerate(images):
        text = texts.get(image.resolve())
        if text is None and image.with_suffix(".txt").is_file():
            text = image.with_suffix(".txt").read_text().strip()
        if text is None and captions:
            text = captions[i % len(captions)]
        if text is None:
            raise ConfigError(f"{image}: no caption (metadata.jsonl, {image.with_suffix('.txt').name})")
        pairs.append((image, text))
    return pairs


def encode_images(pipe, paths: list[Path]) -> torch.Tensor:
    """(N, C, h, w) VAE latents (distribution means x scaling factor) of the images, resized to the
    UNet's resolution: what the teacher's own samples are, so both kinds of x_0 mix in a batch."""
    from PIL import Image

    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size * vae_scale
    out = []
    for start in range(0, len(paths), 16):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + 16]]
        pixels = pipe.image_processor.preprocess(images, height=size, width=size)
        with torch.no_grad():
            dist = pipe.vae.encode(pixels.to(pipe.device, pipe.vae.dtype)).latent_dist
        out.append((dist.mean * pipe.vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def sample_teacher(
    pipe, prompts: list[str], cfg: FinetuneConfig, progress: bool = False, rows: range | None = None
) -> torch.Tensor:
    """(len(prompts)·samples_per_prompt, C, h, w) latents of the teacher's own DDIM samples, each
    prompt `samples_per_prompt` times in a row, from noise seeded by `cfg.seed`; `rows`: only
    these rows of that (a process's share), from the same noise."""
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    unet = pipe.unet
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    every = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    noise = torch.randn(
        (len(every), unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(cfg.seed)
    )
    rows = rows if rows is not None else range(len(every))
    every, noise = [every[i] for i in rows], noise[rows.start : rows.stop]
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    chunks = [torch.zeros((0, unet.config.in_channels, size, size))]
    try:
        for start in tqdm(range(0, len(every), 64), desc="teacher samples", disable=not progress):
            batch = every[start : start + 64]
            with torch.no_grad():
                images = pipe(
                    prompt=batch,
                    latents=noise[start : start + len(batch)].to(pipe.device, unet.dtype),
                    num_inference_steps=cfg.sample_steps,
                    guidance_scale=cfg.sample_guidance,
                    height=size * vae_scale,
                    width=size * vae_scale,
                    output_type="latent",
                ).images
            chunks.append(images.float().cpu())
    finally:
        pipe.scheduler = scheduler
    return torch.cat(chunks)


def teacher_samples(pipe, prompts: list[str], cfg: FinetuneConfig, cache: Path, progress: bool = False) -> torch.Tensor:
    """`sample_teacher`, generated once: reused from `cache` when its settings match, else saved there."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    settings = {"n": cfg.samples_per_prompt, "steps": cfg.sample_steps, "guidance": cfg.sample_guidance}
    key = json.dumps({"prompts": prompts, **settings, "seed": cfg.seed})
    if cache.is_file():
        with safe_open(cache, "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                latents = f.get_tensor("latents")
                logger.info("finetune: reusing %d teacher samples from %s", len(latents), cache)
                return latents
    latents = sample_teacher(pipe, prompts, cfg, progress)
    save_file({"latents": latents.contiguous()}, cache, metadata={"key": key})
    return latents


def shared_teacher_samples(
    pipe, prompts: list[str], cfg: FinetuneConfig, cache_root: Path, teacher: str, progress: bool = False
) -> tuple[torch.Tensor, dict]:
    """`sample_teacher` through the cross-run cache (toolchain/cache.py): keyed by the teacher's
    fingerprint, the prompts, seed, sampler settings and the device and dtype it samples with, so
    a second run (or stage, or study) with the same teacher generates nothing. Under a
    multi-process launch every process draws its share of the rows and receives all of them; the
    main process writes the entry. Returns (latents, {"cache", "bytes", "hit"})."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object
    from safetensors.torch import load_file, save_file

    from toolchain.cache import ENTRY, cached_folder, entry_folder, folder_bytes

    if not teacher:
        raise ValueError("shared_teacher_samples needs the teacher's fingerprint: the cache is keyed by it")
    key = {
        "teacher": teacher,
        "prompts": list(prompts),
        "n": cfg.samples_per_prompt,
        "steps": cfg.sample_steps,
        "guidance": cfg.sample_guidance,
        "seed": cfg.seed,
        "device": pipe.device.type,
        "dtype": str(pipe.unet.dtype),
    }
    state, folder = PartialState(), entry_folder(cache_root, "teacher-samples", key)
    hit = broadcast_object_list([(folder / ENTRY).is_file()])[0]  # one decision for every process
    if hit:
        latents = load_file(folder / SAMPLES_FILE)["latents"]
    else:
        total = len(prompts) * cfg.samples_per_prompt
        share = -(-total // state.num_processes)
        rows = range(min(total, state.process_index * share), min(total, (state.process_index + 1) * share))
        latents = torch.cat(gather_object([sample_teacher(pipe, prompts, cfg, progress, rows)]))
        if state.is_main_process:
            cached_folder(cache_root, "teacher-samples", key, lambda f: _save_samples(f, latents, save_file))
        state.wait_for_everyone()
    logger.info("finetune: %d teacher samples %s %s", len(latents), "reused from" if hit else "cached in", folder)
    return latents, {"cache": str(folder), "bytes": folder_bytes(folder), "hit": hit}


def _save_samples(folder: Path, latents: torch.Tensor, save_file) -> dict:
    save_file({"latents": latents.contiguous()}, folder / SAMPLES_FILE)
    return {"samples": len(latents)}


def sampled_prompts(retain: list[str], forget: list[tuple[str, str]], forget_images=()) -> list[str]:
    """The prompts the teacher samples, in the order the samples cache is keyed by: "", the retain
    prompts, the forget prompts and their anchors."""
    anchors = [a for _, a in forget] + [a for _, _, a in forget_images]
    return list(dict.fromkeys(["", *retain, *(p for p, _ in forget), *anchors]))


def prepare_data(
    pipe,
    retain: list[str],
    forget: list[tuple[str, str]],
    cfg: FinetuneConfig,
    cache: Path | None,
    progress: bool = False,
    retain_images: list[tuple[Path, str]] = (),
    forget_images: list[tuple[Path, str, str]] = (),
    sampler=None,
) -> TrainingData:
    """Sample the teacher `samples_per_prompt` times per prompt with DDIM (once: reused from the
    file `cache` when its settings match; or `sampler(prompts) -> latents`, e.g.
    `shared_teacher_samples`), encode the given images with the VAE, embed every prompt.

    forget: (forget prompt, anchor prompt) pairs, x_0 from the teacher; retain_images: (image,
    caption) and forget_images: (image, forget prompt, anchor prompt) take x_0 from real images.
    """
    captions = [c for _, c in retain_images] + [c for _, c, _ in forget_images]
    sampled = sampled_prompts(retain, forget, forget_images)
    prompts = list(dict.fromkeys([*sampled, *captions]))
    pid = {p: i for i, p in enumerate(prompts)}
    n = cfg.samples_per_prompt
    latents = sampler(sampled) if sampler is not None else teacher_samples(pipe, sampled, cfg, cache, progress)

    def rows(prompt: str) -> list[int]:
        return [pid[prompt] * n + i for i in range(n)]

    retain_rows = [r for p in retain for r in rows(p)]
    retain_pids = [pid[p] for p in retain for _ in range(n)]
    forget_rows, forget_pids, anchor_pids, anchor_rows = [], [], [], []
    for prompt, anchor in forget:
        forget_rows += rows(prompt)
        forget_pids += [pid[prompt]] * n
        anchor_pids += [pid[anchor]] * n
        anchor_rows += rows(anchor)
    if retain_images or forget_images:  # real images: one x_0 row each, after the teacher samples
        first = len(latents)
        paths = [p for p, _ in retain_images] + [p for p, *_ in forget_images]
        latents = torch.cat([latents, encode_images(pipe, paths)])
        retain_rows += range(first, first + len(retain_images))
        retain_pids += [pid[c] for _, c in retain_images]
        first += len(retain_images)
        for i, (_, prompt, anchor) in enumerate(forget_images):
            forget_rows.append(first + i)
            forget_pids.append(pid[prompt])
            anchor_pids.append(pid[anchor])
            anchor_rows.append(rows(anchor)[i % n])
    long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return TrainingData(
        latents=latents,
        emb=encode_prompts(pipe, prompts),
        retain_rows=long(retain_rows),
        retain_pids=long(retain_pids),
        forget_rows=long(forget_rows),
        forget_pids=long(forget_pids),
        anchor_pids=long(anchor_pids),
        anchor_rows=long(anchor_rows),
        ids=pipe.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids,
    )


# ----------------------------------------------------------------------------------------------
# Seeded batches


def step_generator(cfg: FinetuneConfig, step: int, stream: int) -> torch.Generator:
    """Every random draw of a step comes from (seed, step, stream): resumed runs repeat it exactly."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 16 + stream)


def lower_batch(data: TrainingData, cfg: FinetuneConfig, step: int, stream: int, num_timesteps: int):
    """Global retain batch: x0 (B, C, h, w), noise, t (B,), prompt ids (B,) with dropout to ""."""
    g = step_generator(cfg, step, stream)
    idx = torch.randint(len(data.retain_rows), (cfg.batch_size,), generator=g)
    x0 = data.latents[data.retain_rows[idx]]
    pids = data.retain_pids[idx]
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.prompt_dropout
    pids = torch.where(drop, torch.zeros_like(pids), pids)
    t = torch.randint(0, num_timesteps, (cfg.batch_size,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, noise, t, pids


def upper_batch(data: TrainingData, cfg: FinetuneConfig, step: int, stream: int, num_timesteps: int):
    """Global forget batch: x0, noise, t, forget prompt ids, anchor prompt ids."""
    g = step_generator(cfg, step, stream)
    idx = torch.randint(len(data.forget_rows), (cfg.upper_batch_size,), generator=g)
    rows = data.anchor_rows if OBJECTIVE_LATENTS[cfg.objective] == "anchor" else data.forget_rows
    x0 = data.latents[rows[idx]]
    t = torch.randint(0, num_timesteps, (cfg.upper_batch_size,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, noise, t, data.forget_pids[idx], data.anchor_pids[idx]
