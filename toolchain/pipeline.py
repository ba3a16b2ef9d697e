"""Plan the stage chain, run it, skip sealed stages, resume, and lay out the deliverables.

Run folder layout (`--out`):
    00-source/manifest.json      points at the input model (never copied, never modified)
    01-prune/                    diffusers folder + manifest.json
    02-finetune/                 (with finetune.enabled) distilled student, unlearning --erase
    02-concept_prune/            (with concept_prune.enabled) skilled neurons of --erase zeroed
    02-export/                   target-format folder + manifest.json (02-coreml/, 02-executorch/:
                                 converted from PyTorch)
    03-quantize/                 (with quantize.enabled / quantize.fp16) int8 / fp16 ONNX folder
    03-benchmark/                report.json, report.md + manifest.json
    deploy/<target>/             the deliverable, laid out as the target's users expect
    report.json, report.md       the run's report

Several processes (`accelerate launch --multi_gpu --num_processes N -m toolchain.cli ...`, or
torchrun): process 0 runs the chain as one process would; the others wait for it and join only
the `finetune` stage (DDP, each process a slice of the global batch), then exit.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain import artifact as art
from toolchain.cache import default_cache_dir
from toolchain.config import (
    BenchmarkSettings,
    ConceptPruneSettings,
    ConfigError,
    DecoderSettings,
    ExecuTorchSettings,
    FinetuneSettings,
    QnnSettings,
    QuantizeSettings,
    RunConfig,
    check_finetune,
    load_concept,
    resolve_finetune,
    to_dict,
)
from toolchain.models.io import ModelError, check_pipeline_folder, link_or_copy_tree
from toolchain.runfolder import RunFolder, RunLock, check_out_dir

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What a stage may know besides its input and its typed settings: where it writes, what came before."""

    run_dir: Path
    out_dir: Path  # the stage's `.partial` folder: the only place it writes
    chain: list[art.Artifact]  # sealed artifacts before this stage, source first
    progress: bool = True
    # the cross-run cache (toolchain/cache.py): what costs the same for every run of one model
    cache_dir: Path = field(default_factory=default_cache_dir)


@dataclass(frozen=True)
class Stage:
    name: str
    version: int  # bump when the stage's output changes for the same input and config
    # everything the stage reads, typed: its config section, or a *Settings bundle of the section and the
    # run-wide settings it uses; hashed whole into the fingerprint, so nothing it reads goes unhashed
    settings: Callable[[RunConfig], Any]

    def run(self, source: art.Artifact, settings: Any, ctx: RunContext) -> art.Artifact:
        """`toolchain.stages.<name>.run`, imported only when the stage runs (heavy libraries)."""
        return importlib.import_module(f"toolchain.stages.{self.name}").run(source, settings, ctx)


def _finetune_settings(cfg: RunConfig) -> FinetuneSettings:
    """The resolved section, the erased concepts and the content of the image folders finetune reads:
    changed images re-run the stage like changed settings do."""
    folders = [cfg.finetune.retain_data] if cfg.finetune.enabled and cfg.finetune.retain_data else []
    if cfg.finetune.enabled:
        folders += [c.images for c in map(load_concept, cfg.erase) if c.images]
    data = {f: art.hash_folder(Path(f)) if Path(f).is_dir() else "missing" for f in folders}
    return FinetuneSettings(resolve_finetune(cfg.finetune, cfg.erase), list(cfg.erase), data or None)


STAGES = {
    "prune": Stage("prune", 1, lambda c: c.prune),
    "finetune": Stage("finetune", 1, _finetune_settings),
    "concept_prune": Stage("concept_prune", 1, lambda c: ConceptPruneSettings(c.concept_prune, list(c.erase))),
    "decoder": Stage(
        "decoder", 1, lambda c: DecoderSettings(c.decoder, resolve_finetune(c.finetune, c.erase), list(c.erase))
    ),
    "export": Stage("export", 1, lambda c: c.export),
    "quantize": Stage("quantize", 1, lambda c: QuantizeSettings(c.quantize, list(c.erase))),
    "ort": Stage("ort", 1, lambda c: c.export.ort_optimization),
    "coreml": Stage("coreml", 1, lambda c: c.coreml),
    "qnn": Stage("qnn", 1, lambda c: QnnSettings(c.qnn, c.quantize, list(c.erase))),
    "executorch": Stage("executorch", 1, lambda c: ExecuTorchSettings(c.executorch, c.quantize, list(c.erase))),
    "benchmark": Stage(
        "benchmark",
        1,
        lambda c: BenchmarkSettings(c.benchmark, list(c.erase), c.attack, c.target, c.description),
    ),
}


def plan(cfg: RunConfig) -> list[Stage]:
    """The stages this config runs, in order; refuses configs no stage chain can honour."""
    from toolchain.device_config import load_device_profile

    for name in cfg.erase:
        load_concept(name)  # an unknown concept is bad input, found before any work
    load_device_profile(cfg.benchmark.profile).check_deliverable(cfg.target)
    stages = []
    if cfg.prune.method != "none":
        stages.append(STAGES["prune"])
    if cfg.finetune.enabled:
        check_finetune(resolve_finetune(cfg.finetune, cfg.erase), cfg.erase)
        stages.append(STAGES["finetune"])
    if cfg.concept_prune.enabled:
        if not cfg.erase:
            raise ConfigError("concept_prune.enabled=true needs a concept to erase; pass --erase CONCEPT")
        stages.append(STAGES["concept_prune"])
    if cfg.decoder.enabled:
        if cfg.target != "coreml" and "vae_encoder" in cfg.export.components:
            raise ConfigError(
                "decoder.enabled=true replaces the VAE by a tiny one, whose encoder does not export; "
                "drop vae_encoder from export.components"
            )
        stages.append(STAGES["decoder"])
    # Core ML and ExecuTorch convert from PyTorch; ORT format and QNN convert the ONNX export
    if cfg.target == "coreml":
        if cfg.quantize.enabled or cfg.quantize.fp16:
            raise ConfigError(
                "quantize.* applies to ONNX targets; for Core ML use coreml.compression=int8|palettize6|... "
                "and coreml.precision=fp16"
            )
        stages.append(STAGES["coreml"])
    elif cfg.target == "executorch":
        if cfg.quantize.enabled or cfg.quantize.fp16:
            raise ConfigError(
                "quantize.enabled/fp16 apply to ONNX targets; for ExecuTorch use executorch.precision=int8"
            )
        _check_executorch()
        stages.append(STAGES["executorch"])
    else:
        stages.append(STAGES["export"])
        if cfg.target == "qnn" and (cfg.quantize.enabled or cfg.quantize.fp16):
            raise ConfigError("quantize.enabled/fp16 apply to ONNX Runtime's CPU; for QNN use qnn.precision=w8a16|fp16")
        if cfg.quantize.enabled or cfg.quantize.fp16:
            stages.append(STAGES["quantize"])
        if cfg.target == "ort":
            stages.append(STAGES["ort"])
        if cfg.target == "qnn":
            _check_qnn(cfg)
            stages.append(STAGES["qnn"])
    stages.append(STAGES["benchmark"])
    return stages


def _check_qnn(cfg: RunConfig) -> None:
    """--target qnn: a known SoC and the runtime installed, before any work."""
    from toolchain.runtime.qnn import SOCS, QnnUnavailable, qnn_device

    if cfg.qnn.soc not in SOCS:
        raise ConfigError(f"qnn.soc={cfg.qnn.soc!r}: unknown SoC; choose one of {sorted(SOCS)}")
    try:
        qnn_device()
    except QnnUnavailable as exc:
        raise ConfigError(str(exc)) from exc


def _check_executorch() -> None:
    """--target executorch: the runtime installed, before any work."""
    from toolchain.runtime.executorch import ExecuTorchUnavailable, require_executorch

    try:
        require_executorch()
    except ExecuTorchUnavailable as exc:
        raise ConfigError(str(exc)) from exc


def describe_plan(cfg: RunConfig, model: Path, out: Path, stages: list[Stage]) -> str:
    lines = [f"model   {model}", f"target  {cfg.target}", f"out     {out}"]
    if cfg.erase:
        lines.append(f"erase   {', '.join(cfg.erase)}")
    state = _sealed_states(out, model, cfg, stages) if out.is_dir() else {}
    for i, stage in enumerate(stages, 1):
        status = state.get(stage.name, "run")
        settings = ", ".join(f"{k}={v}" for k, v in _stage_config(stage, cfg).items())
        lines.append(f"{i:02d}-{stage.name:<10} [{status}] {settings}")
    lines.append(f"deploy  {out / 'deploy' / cfg.target}")
    return "\n".join(lines)


def _stage_config(stage: Stage, cfg: RunConfig) -> dict[str, Any]:
    """The settings as one flat dict (the fingerprint's and the manifest's): a bundle's section
    fields first, then its other settings; a setting left None is omitted."""
    settings = stage.settings(cfg)
    if not dataclasses.is_dataclass(settings):
        return {"setting": settings}
    fields = [f.name for f in dataclasses.fields(settings)]
    first = getattr(settings, fields[0])
    if not dataclasses.is_dataclass(first):  # a section itself
        return to_dict(settings)
    rest = {name: getattr(settings, name) for name in fields[1:] if getattr(settings, name) is not None}
    return {**to_dict(first), **{k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in rest.items()}}


def _sealed_states(out: Path, model: Path, cfg: RunConfig, stages: list[Stage]) -> dict[str, str]:
    """Which stages a run would skip: for `--dry-run`, without touching anything."""
    states = {}
    source_file = out / "00-source" / art.MANIFEST
    source = art.load(out / "00-source") if source_file.is_file() else None
    # content is re-hashed only by a real run; a dry run trusts a source sealed from the same path
    parent = source.fingerprint if source is not None and source.model_path == model else None
    for i, stage in enumerate(stages, 1):
        fp = art.fingerprint(parent, stage.name, stage.version, _stage_config(stage, cfg))
        folder = out / f"{i:02d}-{stage.name}"
        sealed = (folder / art.MANIFEST).is_file() and art.load(folder).fingerprint == fp
        states[stage.name] = "skip: sealed" if parent and sealed else "run"
        parent = fp
    return states


def _seal_source(model: Path, run: RunFolder) -> art.Artifact:
    """The input model as artifact 00: a manifest pointing at it, fingerprinted by content."""
    out = run.root
    folder = out / "00-source"
    digest = art.hash_folder(model)
    if (folder / art.MANIFEST).is_file():
        sealed = art.load(folder)
        if sealed.fingerprint == digest and sealed.model_path == model:
            return sealed
    from toolchain.models.io import component_params

    partial = out / ("00-source" + art.PARTIAL_SUFFIX)
    run.remove(partial.name)
    run.record(partial.name)
    partial.mkdir(parents=True)
    source = art.Artifact(
        path=partial,
        kind="diffusers",
        stage="source",
        fingerprint=digest,
        model_path=model,
        metrics={"params": component_params(model), "size_bytes": art.folder_size(model)},
        versions=library_versions(),
    )
    run.record(folder.name)  # before the rename: a crash between the two leaves nothing unrecorded
    sealed = art.seal(source, folder)
    run.forget(partial.name)
    return sealed


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("diffusion-compress", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "torch-pruning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


DISTRIBUTED_TIMEOUT_H = 6  # how long the other processes may wait for process 0's stages


class _Followers:
    """Process 0's link to the other processes of a multi-process launch. They wait for exactly
    one message: the finetune job to join, or None (nothing to train, or process 0 failed)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.sent = self.world == 1
        if self.world > 1:
            from datetime import timedelta

            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            cpu = parse_flag_from_env("ACCELERATE_USE_CPU")  # as Accelerator() reads it
            self.state = PartialState(cpu=cpu, timeout=timedelta(hours=DISTRIBUTED_TIMEOUT_H))

    def send(self, job: dict | None) -> None:
        if not self.sent:
            import torch.distributed as dist

            self.sent = True
            dist.broadcast_object_list([job], src=0, device=self.state.device)

    def receive(self) -> dict | None:
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, device=self.state.device)
        return box[0]


def _follow(cfg: RunConfig, out: Path, followers: _Followers, progress: bool) -> list[art.Artifact]:
    """A process other than 0: train with process 0 if it runs finetune, else return at once."""
    job = followers.receive()
    if job is None:
        return []
    chain = [art.load(Path(path)) for path in job["chain"]]
    stage = STAGES["finetune"]
    ctx = RunContext(run_dir=out, out_dir=Path(job["partial"]), chain=chain, progress=progress)
    stage.run(chain[-1], stage.settings(cfg), ctx)
    return []


def run(
    cfg: RunConfig,
    model: Path,
    out: Path,
    force: bool = False,
    from_stage: str | None = None,
    progress: bool = True,
) -> list[art.Artifact]:
    """Run the plan; sealed stages whose fingerprint matches are skipped. Returns the chain
    (empty in the processes other than 0 of a multi-process launch)."""
    followers = _Followers()
    if followers.rank > 0:
        return _follow(cfg, out, followers, progress)
    try:
        return _run_main(cfg, model, out, force, from_stage, progress, followers)
    finally:
        followers.send(None)  # no finetune ran (or it failed before): release the others


REPORT_FILES = ("report.json", "report.md", "latency.png", "quality.png", "samples.png", "attack.png")


def _run_main(
    cfg: RunConfig,
    model: Path,
    out: Path,
    force: bool,
    from_stage: str | None,
    progress: bool,
    followers: _Followers,
) -> list[art.Artifact]:
    stages = plan(cfg)
    names = [s.name for s in stages]
    if from_stage is not None and from_stage not in names:
        raise ConfigError(f"--from-stage {from_stage}: not in this plan; choose one of {names}")
    check_pipeline_folder(model)
    check_out_dir(out, model)
    first_made = None  # the topmost folder made for --out, removed again on bad input
    for parent in (out, *out.parents):
        if parent.exists():
            break
        first_made = parent
    out.mkdir(parents=True, exist_ok=True)
    folder = None
    try:
        with RunLock(out):
            folder = RunFolder(out, first_made)
            folder.create()
            return _run_chain(cfg, model, folder, stages, force, from_stage, progress, followers)
    except (ConfigError, ModelError):
        if folder is not None:  # bad input found late: leave nothing this invocation made
            folder.remove_new()
        raise


def _run_chain(
    cfg: RunConfig,
    model: Path,
    folder: RunFolder,
    stages: list[Stage],
    force: bool,
    from_stage: str | None,
    progress: bool,
    followers: _Followers,
) -> list[art.Artifact]:
    """The chain under the run lock: clear what this run replaces (compress's own entries only),
    run or skip each stage, lay out the deliverable."""
    out = folder.root
    planned = ["00-source"] + [f"{i:02d}-{s.name}" for i, s in enumerate(stages, 1)]
    replaced = [*planned, *(n + art.PARTIAL_SUFFIX for n in planned), f"deploy/{cfg.target}", "deploy"]
    for rel in [*replaced, *REPORT_FILES]:
        folder.check_owned(rel)  # before any work: nothing of the user's is in the way
    for old in out.glob("[0-9][0-9]-*"):  # stages of an earlier, different plan
        if old.name.removesuffix(art.PARTIAL_SUFFIX) not in planned:
            folder.remove(old.name)
    # the deliverable is rebuilt at the end: a run that fails must not leave an older one
    for rel in (f"deploy/{cfg.target}", *REPORT_FILES):
        folder.remove(rel)
    chain = [_seal_source(model, folder)]
    rerun = force
    for i, stage in enumerate(stages, 1):
        rerun = rerun or stage.name == from_stage
        artifact, ran = _run_stage(i, stage, cfg, folder, chain, rerun, progress, followers)
        chain.append(artifact)
        rerun = rerun or ran  # everything after a stage that ran sees a new input
    _deploy(cfg, folder, chain)
    return chain


def _run_stage(
    i: int,
    stage: Stage,
    cfg: RunConfig,
    folder: RunFolder,
    chain: list[art.Artifact],
    rerun: bool,
    progress: bool,
    followers: _Followers | None = None,
) -> tuple[art.Artifact, bool]:
    """Run one stage into its `.partial` folder and seal it, or skip it; returns (artifact, ran)."""
    out = folder.root
    config = _stage_config(stage, cfg)
    fp = art.fingerprint(chain[-1].fingerprint, stage.name, stage.version, config)
    final = out / f"{i:02d}-{stage.name}"
    partial = out / (final.name + art.PARTIAL_SUFFIX)
    if not rerun and (final / art.MANIFEST).is_file():
        sealed = art.load(final)
        if sealed.fingerprint == fp:
            logger.info("%s: sealed with the same fingerprint, skipped", final.name)
            return sealed, False
    # A .partial of the same fingerprint may hold checkpoints to resume from; any other is stale.
    marker = partial / ".fingerprint"
    if partial.exists() and (not marker.is_file() or marker.read_text() != fp):
        folder.remove(partial.name)
    folder.record(partial.name)
    partial.mkdir(parents=True, exist_ok=True)
    marker.write_text(fp)
    logger.info("%s: running", final.name)
    ctx = RunContext(run_dir=out, out_dir=partial, chain=list(chain), progress=progress)
    if followers is not None and stage.name == "finetune":  # the other processes train with this one
        followers.send({"partial": str(partial), "chain": [str(a.path) for a in chain]})
    start = time.perf_counter()
    result = stage.run(chain[-1], stage.settings(cfg), ctx)
    result.path = partial
    result.stage = stage.name
    result.fingerprint = fp
    result.parent = chain[-1].fingerprint
    result.config = config
    result.versions = library_versions()
    result.metrics["wall_s"] = round(time.perf_counter() - start, 3)
    marker.unlink()
    folder.record(final.name)  # before the rename: a crash between the two leaves nothing unrecorded
    sealed = art.seal(result, final)
    folder.forget(partial.name)
    return sealed, True


def _deploy(cfg: RunConfig, folder: RunFolder, chain: list[art.Artifact]) -> None:
    """Copy the exported model to deploy/<target>/ and the report beside the run."""
    out = folder.root
    exported = next(a for a in reversed(chain) if a.kind == cfg.target)
    report = next(a for a in reversed(chain) if a.stage == "benchmark")
    deploy = out / "deploy" / cfg.target
    staging = out / "deploy" / (cfg.target + art.PARTIAL_SUFFIX)
    folder.record("deploy", staging.relative_to(out).as_posix())
    folder.remove(staging.relative_to(out).as_posix())
    link_or_copy_tree(exported.path, staging)
    (staging / art.MANIFEST).unlink()
    plots = json.loads((report.path / "report.json").read_text()).get("plots", [])
    names = ["report.json", "report.md", *plots]
    for name in names:
        shutil.copy2(report.path / name, staging / name)
    from benchmarks.model_card import CARD, CARD_FILE

    if (report.path / CARD_FILE).is_file():  # the benchmark stage's model card, named as the hub names it
        shutil.copy2(report.path / CARD_FILE, staging / CARD)
    folder.remove(deploy.relative_to(out).as_posix())
    files = [(deploy / p.relative_to(staging)).relative_to(out).as_posix() for p in staging.rglob("*") if p.is_file()]
    folder.record(deploy.relative_to(out).as_posix(), *files)  # before the rename, as for stages
    os.replace(staging, deploy)
    folder.forget(staging.relative_to(out).as_posix())
    for name in names:
        tmp = out / (name + ".tmp")
        shutil.copy2(report.path / name, tmp)
        os.replace(tmp, out / name)
        folder.record(name)
