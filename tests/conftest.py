"""Shared fixtures: tiny real pipelines built offline from committed configs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny: they gain nothing from intra-op threads, and on 2 cores shared
    with other processes OpenMP oversubscription made files 10-30x slower; one thread is as fast
    alone and immune to that."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The cross-run cache (toolchain/cache.py) of this test session: never the user's ~/.cache."""
    previous = os.environ.get("COMPRESS_CACHE")
    os.environ["COMPRESS_CACHE"] = str(tmp_path_factory.mktemp("compress-cache"))
    yield Path(os.environ["COMPRESS_CACHE"])
    if previous is None:
        os.environ.pop("COMPRESS_CACHE")
    else:
        os.environ["COMPRESS_CACHE"] = previous


def pytest_collection_modifyitems(config, items):
    """Hardware markers skip by capability, never by branches in the tests."""
    import sys

    skip_gpu = skip_mac = None
    for item in items:
        if "gpu" in item.keywords:
            import torch

            if not torch.cuda.is_available():
                skip_gpu = skip_gpu or pytest.mark.skip(reason="needs a CUDA device")
                item.add_marker(skip_gpu)
        if "macos" in item.keywords and sys.platform != "darwin":
            skip_mac = skip_mac or pytest.mark.skip(reason="needs macOS")
            item.add_marker(skip_mac)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A random tiny Stable Diffusion pipeline folder (16x16 px), built once per session."""
    from toolchain.models.io import build_pipeline_from_configs

    return build_pipeline_from_configs(ASSETS / "tiny-sd", tmp_path_factory.mktemp("tiny-sd") / "pipe", seed=0)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    """The tiny pipeline loaded, once per test module (a module may change its components)."""
    from toolchain.models.io import load_pipeline

    return load_pipeline(tiny_sd_dir)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_pipe, tmp_path_factory) -> Path:
    """`tiny_pipe` exported to an ONNX folder (optimum's layout), once per test module."""
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "fp32"
    export_onnx(tiny_pipe, out, progress=False)
    return out


@pytest.fixture
def tiny_sd_copy(tiny_sd_dir, tmp_path) -> Path:
    """A private copy a test may damage."""
    return Path(shutil.copytree(tiny_sd_dir, tmp_path / "model"))


def run(model: Path, out: Path, *extra: str) -> int:
    """`compress --target onnx --recipe tiny` in process, quiet."""
    from toolchain.cli import main

    target = [] if "--target" in extra else ["--target", "onnx"]
    return main([*target, "--model", str(model), "--recipe", "tiny", "--out", str(out), "--no-progress", "-q", *extra])


def stage_context(tmp_path: Path, model: Path):
    """A RunContext for calling one stage directly, as the runner would: the source `model` as
    chain[0] with its content fingerprint, `tmp_path/out.partial` to write in, a cache of its own."""
    from toolchain import artifact as art
    from toolchain.pipeline import RunContext

    out = tmp_path / "out.partial"
    out.mkdir()
    source = art.Artifact(path=tmp_path / "src", kind="diffusers", fingerprint=art.hash_folder(model), model_path=model)
    return RunContext(run_dir=tmp_path, out_dir=out, chain=[source], progress=False, cache_dir=tmp_path / "cache")


def manifests(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("[0-9][0-9]-*/manifest.json")}


@pytest.fixture(scope="session")
def finished_run(tiny_sd_dir, tmp_path_factory):
    """One uninterrupted tiny run: (run folder, wall seconds). Asserts the input is untouched."""
    import time

    from toolchain import artifact as art

    out = tmp_path_factory.mktemp("run") / "out"
    before = art.hash_folder(tiny_sd_dir)
    start = time.perf_counter()
    assert run(tiny_sd_dir, out) == 0
    first_s = time.perf_counter() - start
    assert art.hash_folder(tiny_sd_dir) == before, "the input model must never be modified"
    return out, first_s


# Erase 7 from the embedded digits model through the whole chain (prune 30% channels -> bilevel
# finetune -> ONNX export -> benchmark), cheaply: 80 steps with an ESD-from-the-anchor upper step
# after every lower step (measured: ~25 s of training on 2 cores, leakage of 7 through ONNX 1 of 56
# images). Few steps do not let a distilled student draw 7 on its own (attack-digits.md: 16% after
# 600 steps), so its distillation data keeps 7's prompts, as captions of web-scale data would: only
# the unlearning level removes the concept, and with unlearning off the student draws 7s.
SEVENS = [
    "a handwritten digit seven",
    "the number 7",
    "7",
    "a drawing of a seven",
    "seven",
    "handwritten 7",
    "the digit seven",
]
DIGITS_ERASE_RETAIN = [f"the number {d}" for d in range(10) if d != 7] + SEVENS  # configs/concepts/digit-7.yaml
DIGITS_ERASE_OVERRIDES = [
    "finetune.enabled=true",
    "finetune.mode=bilevel",
    "finetune.objective=esd",
    "finetune.esd.from_anchor=true",
    "finetune.esd.eta=2.0",
    "finetune.steps=80",
    "finetune.upper_every=1",
    "finetune.batch_size=16",
    "finetune.upper_batch_size=8",
    "finetune.lower_lr=1e-3",
    "finetune.upper_lr=1e-3",
    "finetune.samples_per_prompt=2",
    "finetune.sample_steps=10",
    "finetune.checkpoint_every=100000",
    "finetune.retain_prompts=[" + ",".join(f'"{p}"' for p in DIGITS_ERASE_RETAIN) + "]",
    "benchmark.judge=none",  # the tests judge the deliverable themselves, with more images of 7
    "benchmark.warmup=0",
    "benchmark.repeats=1",
]


@pytest.fixture(scope="session")
def erased_digits_run(tmp_path_factory):
    """`compress --target onnx --erase 7` on the embedded digits model (settings above): the run
    folder, with 01-prune, 02-finetune, 03-export and deploy/onnx (the fp32 erased student)."""
    from toolchain.models.io import EMBEDDED_MODEL

    out = tmp_path_factory.mktemp("erase-7") / "run"
    assert run(EMBEDDED_MODEL, out, "--erase", "7", *DIGITS_ERASE_OVERRIDES) == 0
    return out
