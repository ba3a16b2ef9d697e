"""Load, check and save Stable Diffusion pipelines in the diffusers folder layout.

Everything here reads safetensors only and never runs remote code. Checks that can fail on user
input (`check_pipeline_folder`) are cheap and run before a run folder is created, so bad input
leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from toolchain.errors import ModelError  # noqa: F401  (re-exported: callers catch it from here)

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "digits-sd"
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
PRUNING_RECORD = "pruning_record.json"
RUN_MARKER = ".compress-run"  # written by the runner into every run folder (toolchain/runfolder.py)
FICLONE = 0x40049409  # Linux ioctl: reflink (copy-on-write clone) of a whole file


def resolve_model(model: str | None) -> Path:
    """Map `--model` to a local pipeline folder: None is the embedded digits model.

    A string that is not an existing path but looks like a hub id (`org/name`) is downloaded
    only when the hub is reachable and offline mode is off; otherwise a clear error.
    """
    if model is None:
        return EMBEDDED_MODEL
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve()
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise ModelError(
                f"--model {model}: no such folder, and HF_HUB_OFFLINE is set so the hub is not "
                "tried; download the pipeline elsewhere and pass its folder"
            )
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(
                model,
                allow_patterns=["*.json", "*.txt", "*.safetensors"],
                ignore_patterns=["*.fp16.*", "*non_ema*", "*.ckpt"],
            )
        except Exception as exc:  # the hub is unreachable or the id does not exist
            raise ModelError(
                f"--model {model}: not a local folder and the hub could not provide it "
                f"({type(exc).__name__}); pass a local diffusers pipeline folder"
            ) from None
        return Path(local)
    raise ModelError(f"--model {model}: no such folder; pass a diffusers pipeline folder")


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file by reading only its header."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a valid safetensors file ({exc}); re-download or re-save it") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ModelError(
            f"{path}: truncated safetensors file ({size} bytes, header expects {8 + header_len + end}); "
            "re-download or re-save it"
        )


def check_pipeline_folder(path: Path) -> dict[str, Any]:
    """Check that `path` is a complete Stable Diffusion pipeline with safetensors weights.

    Returns the parsed model_index.json. Raises ModelError with a one-line fix otherwise.
    """
    if not path.is_dir():
        raise ModelError(f"--model {path}: not a folder; pass a diffusers pipeline folder")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelError(
            f"--model {path}: no model_index.json, so this is not a diffusers pipeline folder; "
            "pass the folder that contains model_index.json"
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_file}: invalid JSON ({exc}); re-save the pipeline") from None
    missing = [c for c in REQUIRED_COMPONENTS if c not in index or not (path / c).is_dir()]
    if missing:
        raise ModelError(
            f"--model {path}: missing components {missing}; a Stable Diffusion pipeline needs "
            f"{list(REQUIRED_COMPONENTS)}"
        )
    for component in WEIGHT_COMPONENTS:
        files = sorted((path / component).glob("*.safetensors"))
        if not files:
            raise ModelError(
                f"{path / component}: no .safetensors weights (pickled .bin weights are refused); "
                "convert the pipeline with save_pretrained(safe_serialization=True)"
            )
        for file in files:
            check_safetensors(file)
    check_components(path)
    return index


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ModelError(f"{file}: missing; re-save the pipeline with save_pretrained")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file}: invalid JSON ({exc}); fix or re-save it") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file}: not a JSON object; fix or re-save it")
    return data


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def check_components(path: Path) -> None:
    """Build each component from its config on the meta device (no memory, no weights read) and
    check the weights' shapes, the tokenizer and the scheduler against it: a config diffusers
    cannot build or weights that do not fit it are one line of bad input before a run folder
    exists, not a traceback inside a stage."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    builders = {
        "unet": UNet2DConditionModel.from_config,
        "vae": AutoencoderKL.from_config,
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
    }
    configs, shapes = {}, {}
    for name, build in builders.items():
        file = path / name / "config.json"
        configs[name] = _read_json(file)
        try:
            with torch.device("meta"):
                module = build(configs[name])
        except Exception as exc:  # diffusers and transformers raise many kinds for bad configs
            raise ModelError(f"{file}: cannot build the {name} from it ({_first_line(exc)}); fix the config") from None
        shapes[name] = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    _check_fit(path, configs)
    for name, expected in shapes.items():
        if not (path / name / PRUNING_RECORD).is_file():  # a pruned UNet's config is its base's
            _check_weight_shapes(path / name, expected)
    _check_tokenizer(path, configs["text_encoder"])
    _check_scheduler(path / "scheduler" / "scheduler_config.json")


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the safetensors files of `folder`, read from their headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def _check_weight_shapes(folder: Path, expected: dict[str, tuple[int, ...]]) -> None:
    found = safetensors_shapes(folder)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ModelError(
            f"{folder}: the weights lack {len(missing)} tensor(s) its config.json needs (e.g. {missing[0]}); "
            "the weights and config.json are from different models: re-save the pipeline"
        )
    wrong = [k for k in expected if found[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise ModelError(
            f"{folder}: {len(wrong)} weight(s) do not fit config.json (e.g. {k} is {list(found[k])}, the config "
            f"builds {list(expected[k])}); the weights and config.json are from different models"
        )


def _check_fit(path: Path, configs: dict[str, dict[str, Any]]) -> None:
    """The components must fit each other: latent channels and text-embedding width."""
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    pairs = [
        ("vae latent_channels", vae.get("latent_channels", 4), "unet in_channels", unet.get("in_channels", 4)),
        (
            "text_encoder hidden_size",
            text.get("hidden_size"),
            "unet cross_attention_dim",
            unet.get("cross_attention_dim"),
        ),
    ]
    for a, va, b, vb in pairs:
        if va != vb:
            raise ModelError(f"--model {path}: {a}={va} but {b}={vb}; the components are from different models")


def _check_tokenizer(path: Path, text_config: dict[str, Any]) -> None:
    from transformers import CLIPTokenizer

    folder = path / "tokenizer"
    _read_json(folder / "tokenizer_config.json")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # missing or corrupt vocab.json / merges.txt
        raise ModelError(
            f"{folder}: not a CLIP tokenizer ({_first_line(exc)}); it needs vocab.json and merges.txt"
        ) from None
    positions = int(text_config.get("max_position_embeddings", 77))
    length = tokenizer.model_max_length
    if not (isinstance(length, int) and 0 < length <= positions):
        raise ModelError(
            f"{folder / 'tokenizer_config.json'}: model_max_length={length} does not fit the text encoder's "
            f'{positions} positions; set "model_max_length": {positions}'
        )
    if len(tokenizer) > int(text_config.get("vocab_size", len(tokenizer))):
        raise ModelError(
            f"{folder}: {len(tokenizer)} tokens but the text encoder has vocab_size={text_config.get('vocab_size')}; "
            "the tokenizer is from another model"
        )


def _check_scheduler(file: Path) -> None:
    import diffusers

    config = _read_json(file)
    name = config.get("_class_name", "")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and "Scheduler" in name):
        raise ModelError(f"{file}: _class_name={name!r} is not a diffusers scheduler; use e.g. DDIMScheduler")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise ModelError(f"{file}: prediction_type={prediction!r}; use epsilon, v_prediction or sample")
    try:
        cls.from_config(config)
    except Exception as exc:
        raise ModelError(f"{file}: cannot build {name} from it ({_first_line(exc)}); fix the config") from None


def load_pipeline(path: Path, torch_dtype=None):
    """Load a StableDiffusionPipeline from a local folder, offline, safetensors only.

    A channel-pruned UNet (one with a pruning record) is rebuilt from its record.
    """
    from diffusers import StableDiffusionPipeline

    kwargs: dict[str, Any] = {}
    if (path / "unet" / PRUNING_RECORD).is_file():
        kwargs["unet"] = load_unet(path / "unet")
    pipe = StableDiffusionPipeline.from_pretrained(
        path,
        use_safetensors=True,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        torch_dtype=torch_dtype,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    from toolchain.models.rebuild import allow_batch_one

    allow_batch_one(pipe.unet)  # a k-step generator runs it at batch 1
    return pipe


def load_unet(unet_dir: Path):
    """Load a UNet folder; a pruned one is rebuilt by replaying its record on the base config."""
    from diffusers import UNet2DConditionModel

    record_file = unet_dir / PRUNING_RECORD
    if not record_file.is_file():
        return UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True)
    from safetensors.torch import load_file

    from toolchain.models.rebuild import rebuild_unet

    record = json.loads(record_file.read_text())
    state_dict = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    return rebuild_unet(record, state_dict)


def save_unet(unet, unet_dir: Path, record: dict | None = None) -> None:
    """Save a UNet as config + safetensors; a pruned one also gets its record."""
    unet_dir.mkdir(parents=True, exist_ok=True)
    if record is None:
        unet.save_pretrained(unet_dir, safe_serialization=True)
        return
    from safetensors.torch import save_file

    # config.json keeps the *base* config so tools can read the folder; the record says how the
    # tensors were shrunk from it.
    (unet_dir / "config.json").write_text(json.dumps(record["base_config"], indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    save_file(state, unet_dir / "diffusion_pytorch_model.safetensors")
    (unet_dir / PRUNING_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def clone_or_copy(src: Path, dst: Path) -> None:
    """Copy a file as a reflink where the filesystem has them (btrfs, XFS, bcachefs: no disk used
    until one side is written, and writing one never changes the other), else byte for byte."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl

        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        shutil.copystat(src, dst)
    except (ImportError, OSError):
        shutil.copy2(src, dst)


def run_folder_of(path: Path) -> Path | None:
    """The compress run folder holding `path` (the nearest folder with the runner's marker)."""
    return next((p for p in path.resolve().parents if (p / RUN_MARKER).is_file()), None)


def link_or_copy(src: Path, dst: Path) -> None:
    """Share a file between artifacts. Within one run folder files are hard-linked: its sealed
    artifacts are never written again, so sharing them is safe and free. Anything else — the
    user's input model above all, or another run's artifact — is cloned or copied, so that no edit
    of a run's file can ever reach it (a hard link would share its bytes). Cost measured on the
    SD-1.5 architecture: the first stage after the source copies the components it does not
    rewrite, once per run (benchmarks/results/run-disk-sd15.md)."""
    own = run_folder_of(src)
    if own is None or own != run_folder_of(dst):
        clone_or_copy(src, dst)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_or_copy_tree(src: Path, dst: Path) -> None:
    for item in sorted(src.rglob("*")):
        target = dst / item.relative_to(src)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            link_or_copy(item, target)


def component_params(folder: Path) -> dict[str, int]:
    """Parameter count per component from safetensors or ONNX initializer headers."""
    counts = {}
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        total = sum(math.prod(shape) for shape in safetensors_shapes(component).values())
        for file in component.glob("*.onnx"):
            total += _onnx_params(file)
        if total:
            counts[component.name] = total
    return counts


def _onnx_params(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        n = 1
        for dim in init.dims:
            n *= dim
        total += n if n > 1 else 0  # scalars are constants of the graph, not parameters
    return total


def link_pipeline(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Share every top-level entry of pipeline folder `src` with `dst`, except `skip` (what the
    stage rewrites), the manifest and hidden files."""
    for item in src.iterdir():
        if item.name in skip or item.name == "manifest.json" or item.name.startswith("."):
            continue
        if item.is_dir():
            link_or_copy_tree(item, dst / item.name)
        else:
            link_or_copy(item, dst / item.name)


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    """A StableDiffusionPipeline of these parts, without the safety checker (nothing downloads)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_pipeline_from_configs(config_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Build a randomly initialised pipeline from committed component configs and save it.

    `config_dir` holds unet/config.json, vae/config.json, text_encoder/config.json,
    tokenizer/{vocab.json,merges.txt,tokenizer_config.json} and scheduler/scheduler_config.json.
    Used for offline tests and for real architectures (SD-1.5) measured with random weights.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def read(name: str) -> dict:
        return json.loads((config_dir / name).read_text())

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(read("unet/config.json"))
    vae = AutoencoderKL.from_config(read("vae/config.json"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**read("text_encoder/config.json")))
    tokenizer = CLIPTokenizer.from_pretrained(config_dir / "tokenizer")
    scheduler = DDIMScheduler.from_config(read("scheduler/scheduler_config.json"))
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
