"""The one sampler (toolchain/runtime/sampler.py) through its PyTorch and ONNX Runtime backends:
the same images as diffusers' own pipeline, the same images in both runtimes, independent of
batching, seeded, the k-step generator branch, every UNet feed seen by the calibration hook."""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from toolchain.models.io import EMBEDDED_MODEL, load_pipeline  # noqa: E402
from toolchain.runtime.ort import OrtPipeline, ort_generator  # noqa: E402
from toolchain.runtime.pytorch import diffusers_generator  # noqa: E402
from toolchain.runtime.schedule import SCHEDULE_FILE  # noqa: E402

PROMPTS = ["a photo", "a cat", "x", "a dog", "a b c"]
STEPS = 4
# ORT and PyTorch differ by fp32 summation order only: the tolerance tests/export/test_quantize.py holds the runner to
RUNNER_TOLERANCE = 1e-4
GENERATOR = {"timesteps": [625, 312], "prediction_type": "epsilon"}


@pytest.fixture(scope="module")
def generator_onnx(tiny_onnx, tmp_path_factory):
    """The tiny export carrying a 2-step generator schedule: sampled as a k-step generator."""
    out = shutil.copytree(tiny_onnx, tmp_path_factory.mktemp("onnx") / "generator")
    (out / SCHEDULE_FILE).write_text(json.dumps(GENERATOR))
    return out


def _pipe_images(pipe, prompts, seed, steps, guidance_scale, batch_size=64):
    """What diffusers_generator returned before the sampler: diffusers' own pipeline call, chunked,
    on latents drawn for all prompts at once from one seeded CPU generator."""
    import torch

    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size * scale
    shape = (len(prompts), pipe.unet.config.in_channels, size // scale, size // scale)
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            images = pipe(
                prompt=batch,
                latents=latents[start : start + len(batch)].to(pipe.device, pipe.unet.dtype),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=size,
                width=size,
                output_type="np",
            ).images
            out.append(np.asarray(images, dtype=np.float32))
    return np.concatenate(out)


def test_pytorch_backend_draws_what_the_diffusers_pipeline_draws(tiny_pipe):
    for guidance_scale, batch_size in ((5.0, 64), (5.0, 2), (1.0, 3)):  # 1.0: no guidance, as diffusers decides
        images = diffusers_generator(tiny_pipe, STEPS, guidance_scale, batch_size)(PROMPTS, 3)
        reference = _pipe_images(tiny_pipe, PROMPTS, 3, STEPS, guidance_scale, batch_size)
        assert images.shape == (5, 16, 16, 3) and images.dtype == np.float32
        assert float(np.abs(images - reference).max()) <= 1e-5


def test_pytorch_backend_draws_what_the_diffusers_pipeline_draws_on_digits():
    pipe = load_pipeline(EMBEDDED_MODEL)
    prompts = ["the number 7", "a handwritten digit two", ""]
    images = diffusers_generator(pipe, steps=10)(prompts, 0)
    reference = _pipe_images(pipe, prompts, 0, 10, 5.0)
    assert float(np.abs(images - reference).max()) <= 1e-5
    assert images.std() > 0.05  # real digits, not a blank canvas that would match anything


def test_ort_sampling_of_the_export_matches_pytorch(tiny_pipe, tiny_onnx):
    reference = diffusers_generator(tiny_pipe, steps=STEPS)(PROMPTS, 3)
    np.testing.assert_allclose(ort_generator(tiny_onnx, STEPS, threads=1)(PROMPTS, 3), reference, atol=RUNNER_TOLERANCE)
    pipe = OrtPipeline(tiny_onnx, threads=1)
    np.testing.assert_allclose(pipe(PROMPTS, 3, STEPS), reference, atol=RUNNER_TOLERANCE)
    assert pipe.provider == "CPUExecutionProvider" and pipe.load_ms > 0


def test_images_do_not_depend_on_batch_size(tiny_pipe, tiny_onnx):
    for make in (
        lambda b: diffusers_generator(tiny_pipe, STEPS, batch_size=b),
        lambda b: ort_generator(tiny_onnx, STEPS, threads=1, batch_size=b),
    ):
        whole = make(64)(PROMPTS, 3)
        for batch_size in (1, 2):
            np.testing.assert_allclose(make(batch_size)(PROMPTS, 3), whole, atol=1e-6, rtol=0)
        np.testing.assert_allclose(make(2)(PROMPTS[:3], 3), whole[:3], atol=1e-6, rtol=0)  # image i: (seed, i, prompt)


def test_seed_determines_the_images(tiny_pipe, tiny_onnx):
    for generate in (diffusers_generator(tiny_pipe, STEPS), ort_generator(tiny_onnx, STEPS, threads=1)):
        first = generate(PROMPTS[:2], 7)
        np.testing.assert_array_equal(generate(PROMPTS[:2], 7), first)
        assert float(np.abs(generate(PROMPTS[:2], 8) - first).max()) > 1e-2
        assert generate([], 7).shape == (0, 16, 16, 3)


def test_unet_hook_sees_every_unet_feed(tiny_onnx):
    """steps x chunks feeds, each at batch 2n (unconditional and conditional halves), cast to the
    graph's dtypes: what int8 calibration (export/quantize.py) records."""
    feeds = []
    generate = ort_generator(tiny_onnx, steps=3, threads=1, batch_size=2, unet_hook=feeds.append)
    generate(PROMPTS, 0)
    assert [len(feed["sample"]) for feed in feeds] == [4] * 3 + [4] * 3 + [2] * 3
    assert all(feed["timestep"].shape == () and feed["sample"].dtype == np.float32 for feed in feeds)
    assert [float(feed["timestep"]) for feed in feeds[:3]] == [float(feed["timestep"]) for feed in feeds[3:6]]
    assert float(feeds[0]["timestep"]) > float(feeds[2]["timestep"])


def test_k_step_generator_through_both_backends(tiny_pipe, generator_onnx):
    """The UNet once per generator step at batch n, no guidance; ORT and PyTorch agree."""
    torch_images = diffusers_generator(tiny_pipe, schedule=GENERATOR, batch_size=2)(PROMPTS, 3)
    feeds = []
    ort_images = ort_generator(generator_onnx, threads=1, batch_size=2, unet_hook=feeds.append)(PROMPTS, 3)
    np.testing.assert_allclose(ort_images, torch_images, atol=RUNNER_TOLERANCE)
    assert [len(feed["sample"]) for feed in feeds] == [2, 2, 2, 2, 1, 1]
    assert [float(feed["timestep"]) for feed in feeds[:2]] == [625.0, 312.0]
    np.testing.assert_allclose(OrtPipeline(generator_onnx, threads=1)(PROMPTS, 3), torch_images, atol=RUNNER_TOLERANCE)
    whole = diffusers_generator(tiny_pipe, schedule=GENERATOR)(PROMPTS, 3)
    np.testing.assert_allclose(whole, torch_images, atol=1e-6, rtol=0)
    diffusion = diffusers_generator(tiny_pipe, schedule=None)(PROMPTS, 3)
    assert float(np.abs(diffusion - torch_images).max()) > 1e-2  # the schedule is what was sampled


def _fp16_io(path):
    """Rewrite an ONNX graph so every float input and output is float16 (Casts around the fp32 body)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    casts_in, casts_out = [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = value.name + "_fp32"
            for node in graph.node:
                node.input[:] = [inner if name == value.name else name for name in node.input]
            casts_in.append(helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT))
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for value in graph.output:
        inner = value.name + "_fp32"
        for node in graph.node:
            node.output[:] = [inner if name == value.name else name for name in node.output]
        casts_out.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT16))
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))


def test_fp16_io_folder_samples(tiny_onnx, tmp_path):
    folder = shutil.copytree(tiny_onnx, tmp_path / "fp16-io")
    for component in ("unet", "vae_decoder"):
        _fp16_io(folder / component / "model.onnx")
    feeds = []
    images = ort_generator(folder, STEPS, threads=1, unet_hook=feeds.append)(PROMPTS[:2], 0)
    assert {feed["sample"].dtype for feed in feeds} == {np.dtype(np.float16)}
    assert {feed["timestep"].dtype for feed in feeds} == {np.dtype(np.float16)}
    assert images.dtype == np.float32 and images.shape == (2, 16, 16, 3)
    reference = ort_generator(tiny_onnx, STEPS, threads=1)(PROMPTS[:2], 0)
    assert float(np.abs(images - reference).max()) < 2e-2
    np.testing.assert_allclose(OrtPipeline(folder, threads=1)(PROMPTS[:2], 0, STEPS), images, atol=0)


def test_ort_generator_names_a_folder_without_the_onnx_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder/model.onnx"):
        ort_generator(tmp_path)


def test_pytorch_backend_refuses_a_safety_checker():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="safety_checker=None"):  # it would not run: the images would differ
        diffusers_generator(SimpleNamespace(safety_checker=object()))
