"""Fixed-shape graphs (`export.fixed_shapes`): what a phone accelerator takes, and the same numbers."""

import json
import shutil

import numpy as np
import onnx
import pytest

from export.fixed_shapes import expand_as_add, fix_folder
from export.ort import mobile_usability
from export.validate import ParityError
from toolchain import artifact as art
from toolchain.runtime.ort import FIXED_SHAPES_FILE, component_inputs, ort_feed, ort_session, read_fixed_rows


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def _static(path) -> bool:
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [d for v in [*graph.input, *graph.output] for d in v.type.tensor_type.shape.dim]
    return all(d.HasField("dim_value") and d.dim_value > 0 for d in dims)


def test_fixed_graphs_take_the_app_rows_fold_the_shape_arithmetic_and_match(tiny_onnx, tmp_path):
    folder = shutil.copytree(tiny_onnx, tmp_path / "onnx")
    assert {"Shape", "Expand"} <= _ops(folder / "unet" / "model.onnx")
    record = fix_folder(folder, generator=False, progress=False)
    assert record["batches"] == {"text_encoder": 2, "unet": 2, "vae_decoder": 1}
    assert json.loads((folder / FIXED_SHAPES_FILE).read_text())["inputs"]["unet"]["sample"][0] == 2
    assert read_fixed_rows(folder) == 2
    for name in ("text_encoder", "unet", "vae_decoder"):
        path = folder / name / "model.onnx"
        assert _static(path), name
        assert not {"Shape", "Expand", "ConstantOfShape"} & _ops(path), name
    assert all(row["max_abs_err"] <= row["tolerance"] for row in record["parity"])
    assert next(r for r in record["parity"] if r["component"] == "unet")["expand_rewritten"] == 1
    # the dynamic graph and the fixed one draw the same UNet output on a guided pair
    inputs = component_inputs(tiny_onnx, "unet", batch=2)
    outputs = [ort_session(f / "unet" / "model.onnx")[0] for f in (tiny_onnx, folder)]
    a, b = (s.run(None, ort_feed(s, inputs))[0] for s in outputs)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # what the Core ML EP takes: the dynamic graph is CPU-bound, the fixed one goes whole but for
    # Resize's absent roi, which ORT's estimate counts as dynamic
    before, after = (
        {r["execution_provider"]: r for r in mobile_usability(f / "unet" / "model.onnx", "unet")}
        for f in (tiny_onnx, folder)
    )
    coreml = "CoreML (ML Program)"
    assert before[coreml]["coverage"] < 0.5 and before[coreml]["partitions"] > 3
    assert after[coreml]["coverage"] >= 0.99 and after[coreml]["partitions"] <= 3
    assert after[coreml]["unsupported_ops"] == []
    assert after[coreml]["nodes_blocked_by_dynamic_shapes"] == after[coreml]["of_which_absent_optional_input"]
    assert after["QNN (HTP)"]["partitions"] == 1 and after["QNN (HTP)"]["coverage"] == 1.0


def test_a_generator_is_fixed_to_one_row_and_external_weights_stay_external(tiny_pipe, tmp_path):
    """The layout an SD-1.5 UNet has (weights in model.onnx_data) survives fixing; a k-step
    generator's graphs take the one unguided row it runs at."""
    from export.onnx import export_onnx

    folder = tmp_path / "onnx"
    export_onnx(tiny_pipe, folder, progress=False, external_data_threshold=0)
    assert (folder / "unet" / "model.onnx_data").is_file()
    record = fix_folder(folder, generator=True, progress=False)
    assert record["batches"]["unet"] == 1 and record["inputs"]["text_encoder"]["input_ids"][0] == 1
    assert (folder / "unet" / "model.onnx_data").is_file() and _static(folder / "unet" / "model.onnx")
    assert all(row["max_abs_err"] <= row["tolerance"] for row in record["parity"])
    assert component_inputs(folder, "unet", batch=8)["sample"].shape[0] == 1  # the folder's own rows
    assert not list(folder.glob(".fixed-*"))


def test_a_fixed_graph_that_differs_changes_nothing(tiny_onnx, tmp_path):
    folder = shutil.copytree(tiny_onnx, tmp_path / "onnx")
    before = art.hash_folder(folder)
    with pytest.raises(ParityError, match="fixed-shape graph differs"):
        fix_folder(folder, generator=False, tolerance=-1.0, progress=False)
    assert art.hash_folder(folder) == before
    assert not (folder / FIXED_SHAPES_FILE).exists()


def test_expand_to_a_constant_shape_becomes_the_add_it_is(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"], name="e")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array([2, 1], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert expand_as_add(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Add"]
    assert [t.name for t in model.graph.initializer] == ["y_zeros"]  # the shape went with the Expand
    onnx.save(model, str(tmp_path / "m.onnx"))
    session, _ = ort_session(tmp_path / "m.onnx")
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.broadcast_to(x, (2, 3)))
