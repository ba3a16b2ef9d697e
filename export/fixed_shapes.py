"""Fixed-shape ONNX graphs, what a phone accelerator takes (`export.fixed_shapes`, on for `--target ort`).

    record = fix_folder(onnx_dir, generator=False)   # rewrites the folder's graphs in place

A graph exported with dynamic axes keeps its shape arithmetic (Shape, Gather, Concat, Expand on
computed shapes) as nodes, and ONNX Runtime's phone execution providers refuse every node whose
shape is not known when the model loads. So each component is fixed to the rows the app feeds it
(`export.layout.deploy_batches`: a guided pair per UNet call, one image per VAE decode), its shape
arithmetic folded to constants by ONNX Runtime's basic (provider-independent) optimisations, and
the one op left that a Core ML EP refuses on the digits and SD-1.5 UNets, the Expand of the
timestep to the batch, written as the Add of zeros it is. Each new graph is checked against the
dynamic one on the same inputs before it replaces it; `fixed_shapes.json` beside the graphs says
which shapes the app must feed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from toolchain.runtime.ort import FIXED_SHAPES_FILE

# ONNX Runtime's basic optimisations fold constants and fuse nothing numeric: fp32 reassociation at
# most (digits UNet, measured: 5e-7)
DEFAULT_TOLERANCE = 1e-4
EXTERNAL_DATA_NAME = "model.onnx_data"
FIXABLE = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def fix_folder(onnx_dir: Path, generator: bool, tolerance: float = DEFAULT_TOLERANCE, progress: bool = True) -> dict:
    """Fix every `<component>/model.onnx` of an exported folder to its deploy rows, in place.

    Returns {"batches": {component: rows}, "inputs": {component: {input: shape}}, "parity": [...]}
    and writes it (less parity) to `fixed_shapes.json`. Raises export.validate.ParityError, with
    the folder's graphs untouched, when a fixed graph's outputs differ from the dynamic one's.
    """
    from tqdm.auto import tqdm

    from export.layout import deploy_batches

    onnx_dir = Path(onnx_dir)
    rows = deploy_batches(generator)
    rows["vae_encoder"] = 1
    components = [c for c in FIXABLE if (onnx_dir / c / "model.onnx").is_file()]
    record = {"batches": {}, "inputs": {}, "parity": []}
    staged = []
    with tempfile.TemporaryDirectory(dir=onnx_dir, prefix=".fixed-") as scratch:
        for name in tqdm(components, desc="fix shapes", unit="component", disable=not progress):
            inputs = deploy_inputs(onnx_dir, name, rows[name])
            target = Path(scratch) / name
            record["parity"].append(_fix_component(onnx_dir / name / "model.onnx", target, inputs, tolerance, name))
            record["batches"][name] = rows[name]
            record["inputs"][name] = {k: list(np.shape(v)) for k, v in inputs.items()}
            staged.append(name)
        for name in staged:  # every graph passed: only now is the folder changed
            _replace(Path(scratch) / name, onnx_dir / name)
    (onnx_dir / FIXED_SHAPES_FILE).write_text(
        json.dumps({k: v for k, v in record.items() if k != "parity"}, indent=2) + "\n"
    )
    return record


def deploy_inputs(onnx_dir: Path, component: str, rows: int) -> dict[str, np.ndarray]:
    """Example inputs at the app's shapes: `rows` per call (the VAE decoder and encoder one image),
    the UNet's timestep a scalar as optimum exports it."""
    from toolchain.runtime.ort import component_inputs, read_config

    if component == "vae_encoder":
        vae = read_config(onnx_dir, "vae_encoder")
        size = read_config(onnx_dir, "unet")["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        image = (rows, vae["in_channels"], size[0] * scale, size[1] * scale)
        return {"sample": np.random.default_rng(0).uniform(-1, 1, image).astype(np.float32)}
    inputs = component_inputs(onnx_dir, component, batch=2 * rows if component == "vae_decoder" else rows)
    if component == "unet":
        inputs["timestep"] = np.array(500.0, np.float32)
    return inputs


def fix_graph(src: Path, target_dir: Path, inputs: dict, rewrite_expand: bool = True) -> int:
    """`src` (a `model.onnx`, its weights inline or in `model.onnx_data` beside it) fixed to the
    shapes of `inputs`, folded, and (`rewrite_expand`) its constant-shape Expands written as Adds,
    into `target_dir/model.onnx` (+ `model.onnx_data` where the source had one). Never loads the
    weights into Python. Returns how many Expands were rewritten."""
    target_dir = Path(target_dir)
    external = (src.parent / EXTERNAL_DATA_NAME).is_file()
    model = _load(src, weights=False)  # the graph alone: shape inference cannot serialise 2 GiB of weights
    fix_shapes(model, inputs)
    with tempfile.TemporaryDirectory(dir=target_dir.parent, prefix=".fixing-") as fixed_dir:
        _save(model, Path(fixed_dir) / "model.onnx")
        if external:  # the same weights file, hard-linked (ONNX Runtime refuses a symlink out of the folder)
            os.link(src.parent / EXTERNAL_DATA_NAME, Path(fixed_dir) / EXTERNAL_DATA_NAME)
        del model
        fold_shape_arithmetic(Path(fixed_dir) / "model.onnx", target_dir / "model.onnx", external)
    if not rewrite_expand:
        return 0
    graph = _load(target_dir / "model.onnx", weights=False)
    rewritten = expand_as_add(graph)
    if rewritten:
        _save(graph, target_dir / "model.onnx")  # the weights stay in model.onnx_data
    return rewritten


def _fix_component(src: Path, target_dir: Path, inputs: dict, tolerance: float, name: str) -> dict:
    """`src` fixed into `target_dir/model.onnx` (`fix_graph`); its parity row against `src`."""
    from export.validate import ParityError, psnr

    rewritten = fix_graph(src, target_dir, inputs)
    reference, fixed = _run(src, inputs), _run(Path(target_dir) / "model.onnx", inputs)
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, fixed, strict=True))
    row = {"component": name, "format": "onnx-fixed", "reference": "onnx-dynamic", "max_abs_err": err}
    row.update(psnr_db=min(psnr(a, b) for a, b in zip(reference, fixed, strict=True)), tolerance=tolerance)
    row["expand_rewritten"] = rewritten
    if not err <= tolerance:
        raise ParityError(
            f"{name}: the fixed-shape graph differs from the dynamic one by {err:.3g} (> {tolerance:.3g})"
        )
    return row


def fix_shapes(model, inputs: dict[str, np.ndarray]) -> None:
    """Every graph input fixed to the shape of its example in `inputs`, outputs inferred (from the
    graph alone: the weights may sit in an external file this never reads)."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed

    for graph_input in model.graph.input:
        if graph_input.name in inputs:
            make_input_shape_fixed(model.graph, graph_input.name, list(np.shape(inputs[graph_input.name])))
    inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
    for output in model.graph.output:
        if output.name in inferred and inferred[output.name].type.tensor_type.HasField("shape"):
            output.type.tensor_type.shape.CopyFrom(inferred[output.name].type.tensor_type.shape)


def fold_shape_arithmetic(src: Path, target: Path, external: bool = False) -> None:
    """ONNX Runtime's basic (provider-independent) graph optimisations on a fixed-shape graph: the
    Shape/Gather/Concat arithmetic becomes constants, which phone accelerators then take. `external`:
    the weights go to `model.onnx_data` beside `target` (a graph over protobuf's 2 GiB)."""
    import onnxruntime as ort

    target.parent.mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # the session only writes the folded graph: no packed second copy of the weights, no arena
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    options.optimized_model_filepath = str(target)
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", EXTERNAL_DATA_NAME)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def expand_as_add(model) -> int:
    """Every Expand whose target shape is a constant, written as Add(x, zeros(shape)): the same
    bidirectional broadcast, in an op every phone provider takes (the Core ML EP refuses Expand).
    Returns how many were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    constants = {t.name: t for t in model.graph.initializer}
    expands = [n for n in model.graph.node if n.op_type == "Expand" and n.input[1] in constants]
    types = _elem_types(model) if expands else {}
    count, shapes = 0, set()
    for node in expands:
        shape = constants[node.input[1]]
        dtype = types.get(node.input[0])
        if dtype is None or dtype in (onnx.TensorProto.BOOL, onnx.TensorProto.STRING):
            continue
        zeros = f"{node.output[0]}_zeros"
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(numpy_helper.to_array(shape), np_dtype), zeros))
        shapes.add(node.input[1])
        node.op_type, node.input[1] = "Add", zeros
        node.name = f"{node.name}_as_add"
        count += 1
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for tensor in [t for t in model.graph.initializer if t.name in shapes and t.name not in used]:
        model.graph.initializer.remove(tensor)  # a shape only the rewritten Expand took
    return count


def _elem_types(model) -> dict[str, int]:
    """Element type of every tensor the graph names (inputs, initializers, inferred values)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _load(path: Path, weights: bool = True):
    import onnx

    return onnx.load(str(path), load_external_data=weights)


def _save(model, path: Path) -> None:
    """The graph alone: tensors kept in an external-data file stay there, referenced by name."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _run(path: Path, inputs: dict) -> list[np.ndarray]:
    """The graph's outputs as it stands (no rewrites, no arena: an SD-1.5 UNet's weights held once)."""
    import onnxruntime as ort

    from export.validate import parity_session_options
    from toolchain.runtime.ort import ort_feed

    session = ort.InferenceSession(str(path), parity_session_options(ort), providers=["CPUExecutionProvider"])
    return [np.asarray(o, np.float32) for o in session.run(None, ort_feed(session, inputs))]


def _replace(staged: Path, component_dir: Path) -> None:
    """The staged graph (and its weights file, if any) in place of the component's."""
    for stale in (component_dir / "model.onnx", component_dir / EXTERNAL_DATA_NAME):
        if stale.exists() and not (staged / stale.name).exists():
            stale.unlink()
    for item in staged.iterdir():
        os.replace(item, component_dir / item.name)
