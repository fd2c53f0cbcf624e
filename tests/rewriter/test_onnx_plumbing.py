"""The ONNX plumbing rotaq takes from onnx-ir and onnxscript, checked by exact structure and
values: naming and initializer inputs on load (NameFixPass, RemoveInitializersFromInputsPass),
order (TopologicalSortPass), dead nodes on save (RemoveUnusedNodesPass), opset raises
(onnxscript's ConvertVersionPass after rotaq's own 13..17 -> 18 step) and the emitters' Tape."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rotaq import tags
from rotaq.errors import LoadError, RewriteError
from rotaq.linalg.formats import QFormat
from rotaq.linalg.quant import quantize_rtn
from rotaq.rewriter import onnx_emit
from rotaq.rewriter import onnx_quant as oq
from rotaq.rewriter.onnx import OnnxGraph


def _vi(name, dims=None, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, dims)


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _proto(g: OnnxGraph) -> onnx.ModelProto:
    import onnx_ir as oir

    return oir.serde.serialize_model(g.model)


def _ops(g: OnnxGraph) -> list[tuple[str, str]]:
    return [(n.op_type, n.name) for n in g.model.graph]


W = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
X = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)


# ------------------------------------------------------------------------------ load
def test_unsorted_graph_is_sorted_stably_on_load():
    nodes = [helper.make_node("Relu", ["h"], ["y"], name="relu"),        # reads h, made below
             helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Neg", ["x"], ["z"], name="neg")]           # independent: stays last
    graph = helper.make_graph(nodes, "g", [_vi("x", [2, 8])], [_vi("y"), _vi("z")],
                              [numpy_helper.from_array(W, "W")])
    g = OnnxGraph.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert _ops(g) == [("MatMul", "mm"), ("Relu", "relu"), ("Neg", "neg")]
    y, z = g.run({"x": X})
    assert np.array_equal(y, np.maximum(X @ W, 0)) and np.array_equal(z, -X)


def test_sorted_graph_keeps_its_order():
    nodes = [helper.make_node("Neg", ["x"], ["z"], name="neg"),
             helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [2, 8])], [_vi("y"), _vi("z")],
                              [numpy_helper.from_array(W, "W")])
    g = OnnxGraph.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert _ops(g) == [("Neg", "neg"), ("MatMul", "mm"), ("Relu", "relu")]


def test_cycle_is_a_load_error():
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="a"),
             helper.make_node("Relu", ["a"], ["b"], name="b")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [2, 8])], [_vi("b")])
    with pytest.raises(LoadError, match="cycle"):
        OnnxGraph.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_names_and_initializer_inputs_fixed_on_load():
    """Unnamed nodes become ``{op}_{position}``, a repeated node name is replaced the same way,
    an unnamed node output ``rotaq_v{position}``; an initializer listed as a graph input is
    a constant (not an input) afterwards."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),                    # unnamed
             helper.make_node("Relu", ["h"], [""], name="dup"),  # placeholder, output renamed
             helper.make_node("Neg", ["h"], ["y"], name="dup")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [2, 8]), _vi("W", [8, 4])], [_vi("y")],
                              [numpy_helper.from_array(W, "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    g = OnnxGraph.from_proto(proto)
    assert [n.name for n in g.model.graph] == ["MatMul_0", "dup", "Neg_2"]
    relu_out = list(g.model.graph)[1].outputs[0]
    assert relu_out.name == "rotaq_v3"  # x, W (an initializer now), h, then this output
    assert g.input_names == ["x"] and [v.name for v in g.model.graph.inputs] == ["x"]
    assert list(g.model.graph.initializers) == ["W"]
    assert [n.op for n in g.view().nodes] == ["linear", "other", "neg"]
    # the names are the same on every load of the same file
    assert [n.name for n in OnnxGraph.from_proto(proto).model.graph] == ["MatMul_0", "dup", "Neg_2"]


# ------------------------------------------------------------------------------ save
def test_save_drops_dead_nodes_and_their_initializers(tmp_path):
    dead_w = np.ones((8, 8), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("MatMul", ["x", "D"], ["dead1"], name="dead_mm"),   # nothing reads
             helper.make_node("Relu", ["dead1"], ["dead2"], name="dead_relu"),    # nor this
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [2, 8])], [_vi("y")],
                              [numpy_helper.from_array(W, "W"),
                               numpy_helper.from_array(dead_w, "D"),
                               numpy_helper.from_array(dead_w, "unused")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    ref = _run(proto, {"x": X})[0]
    g = OnnxGraph.from_proto(proto)
    assert len(g.model.graph) == 4  # kept in memory: nothing is removed until the save
    g.save(tmp_path / "out.onnx")
    out = onnx.load(tmp_path / "out.onnx")
    assert [(n.op_type, n.name) for n in out.graph.node] == [("MatMul", "mm"), ("Relu", "relu")]
    assert [t.name for t in out.graph.initializer] == ["W"]
    assert np.array_equal(_run(out, {"x": X})[0], ref)


# ------------------------------------------------------------------------------ opsets
def _old_model(opset: int) -> onnx.ModelProto:
    """x -> ReduceMean(axes attribute) -> Sub -> MatMul (tagged) -> Split (no num_outputs)
    -> Add."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], keepdims=1, name="rm"),
             helper.make_node("Sub", ["x", "mu"], ["xc"], name="sub"),
             helper.make_node("MatMul", ["xc", "W"], ["h"], name="mm"),
             helper.make_node("Split", ["h"], ["s1", "s2"], axis=-1, name="split"),
             helper.make_node("Add", ["s1", "s2"], ["y"], name="add")]
    nodes[2].metadata_props.add(key=tags.ROLE, value=tags.ROLE_CHAIN)
    graph = helper.make_graph(nodes, "g", [_vi("x", ["b", 8])], [_vi("y")],
                              [numpy_helper.from_array(W, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_opset17_model_converted_to_21():
    proto = _old_model(17)
    ref = _run(proto, {"x": X})[0]
    g = OnnxGraph.from_proto(proto)
    graph = g.model.graph
    before = [n for n in graph]
    onnx_emit.require_opset(g, 21)
    assert oq.default_opset(g) == 21 and dict(g.model.opset_imports) == {"": 21}
    assert [n for n in graph] == before  # edited in place: the same node objects, same order
    rm, _, mm, split, _ = before
    assert "axes" not in rm.attributes and rm.inputs[1].const_value.numpy().tolist() == [-1]
    assert split.attributes["num_outputs"].value == 2 and split.attributes["axis"].value == -1
    assert mm.metadata_props[tags.ROLE] == tags.ROLE_CHAIN  # node metadata kept
    out = _proto(g)
    assert out.opset_import[0].version == 21
    assert np.array_equal(_run(out, {"x": X})[0], ref)
    onnx_emit.require_opset(g, 21)  # nothing to do: unchanged
    assert [n for n in graph] == before and len(graph.initializers) == 2


def test_opset18_gridsample_mode_renamed_by_the_converter():
    """GridSample's 'bilinear' became 'linear' in opset 20: ORT refuses the old name there."""
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], mode="bilinear", name="gs")
    graph = helper.make_graph([node], "g", [_vi("x", [1, 2, 4, 4]), _vi("grid", [1, 3, 3, 2])],
                              [_vi("y")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32),
             "grid": rng.uniform(-1, 1, (1, 3, 3, 2)).astype(np.float32)}
    ref = _run(proto, feeds)[0]
    g = OnnxGraph.from_proto(proto)
    onnx_emit.require_opset(g, 21)
    (gs,) = list(g.model.graph)
    assert gs.attributes["mode"].value == "linear" and oq.default_opset(g) == 21
    assert np.array_equal(_run(_proto(g), feeds)[0], ref)


def _groupnorm(channels) -> onnx.ModelProto:
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2,
                            epsilon=1e-5, name="gn")
    inits = [numpy_helper.from_array(np.array([1.5, 0.5], np.float32), "s"),
             numpy_helper.from_array(np.array([0.1, -0.2], np.float32), "b")]
    graph = helper.make_graph([node], "g", [_vi("x", [1, channels, 3])], [_vi("y")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_opset18_groupnorm_converted_or_refused():
    proto = _groupnorm(4)
    x = np.random.default_rng(3).standard_normal((1, 4, 3)).astype(np.float32)
    ref = _run(proto, {"x": x})[0]
    g = OnnxGraph.from_proto(proto)
    onnx_emit.require_opset(g, 21)
    ops = [n.op_type for n in g.model.graph]
    assert ops.count("GroupNormalization") == 1 and ops.count("Expand") == 2  # scale per channel
    assert np.abs(_run(_proto(g), {"x": x})[0] - ref).max() < 1e-6
    g = OnnxGraph.from_proto(_groupnorm("c"))  # channels unknown: the adapter cannot rewrite it
    with pytest.raises(RewriteError, match="GroupNormalization"):
        onnx_emit.require_opset(g, 21)
    assert oq.default_opset(g) == 18


def test_opset12_refused():
    g = OnnxGraph.from_proto(_old_model(17))
    g.model.opset_imports[""] = 12
    with pytest.raises(RewriteError, match="opset 12"):
        onnx_emit.require_opset(g, 21)


# ------------------------------------------------------------------------------ emitters
def _linear_model() -> OnnxGraph:
    w = np.random.default_rng(4).standard_normal((48, 16)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="lin")], "g",
                              [_vi("x", ["b", 48])], [_vi("y")], [numpy_helper.from_array(w, "W")])
    return OnnxGraph.from_proto(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 21)]))


def test_failed_lowering_leaves_the_graph_as_it_was():
    """MatMulNBits refuses a block of 48: nothing the rewrite built stays in the graph (its
    initializers were only on the tape, its nodes are no readers of graph values)."""
    g = _linear_model()
    w, _ = g.get_linear("lin")
    qw = quantize_rtn(w, QFormat("int", 4, True, 48))
    x = g.model.graph.inputs[0]
    with pytest.raises(RewriteError, match="power of two"):
        oq.quantize_linear(g, "lin", qw, None, "matmulnbits")
    assert _ops(g) == [("MatMul", "lin")] and list(g.model.graph.initializers) == ["W"]
    assert [u.node.name for u in x.uses()] == ["lin"]
    assert "com.microsoft" not in g.model.opset_imports


def test_emitted_nodes_and_initializers_enter_the_graph_together():
    g = _linear_model()
    w, _ = g.get_linear("lin")
    qw = quantize_rtn(w, QFormat("int", 4, True, 16))
    oq.quantize_linear(g, "lin", qw, None, "matmulnbits")
    (node,) = list(g.model.graph)
    assert (node.op_type, node.domain, node.name) == ("MatMulNBits", "com.microsoft", "lin")
    assert {a: node.attributes[a].value for a in ("K", "N", "bits", "block_size",
                                                  "accuracy_level")} == {
        "K": 48, "N": 16, "bits": 4, "block_size": 16, "accuracy_level": 0}
    assert node.metadata_props[tags.ROLE] == tags.ROLE_QUANT
    inits = g.model.graph.initializers
    assert sorted(inits) == ["lin.weight_packed", "lin.weight_scale"]
    assert all(inits[n.name] is n for n in node.inputs[1:3])
    assert inits["lin.weight_packed"].const_value.shape.dims == (16, 3, 8)


def test_opset17_local_function_migrated_before_the_converter_inlines_it():
    body = [helper.make_node("ReduceMean", ["a"], ["m"], axes=[-1], keepdims=1),
            helper.make_node("Sub", ["a", "m"], ["b"])]
    fn = helper.make_function("local", "center", ["a"], ["b"], body,
                              [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("center", ["x"], ["y"], domain="local",
                                                name="call")],
                              "g", [_vi("x", [2, 8])], [_vi("y")])
    proto = helper.make_model(graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    ref = _run(proto, {"x": X})[0]
    assert np.abs(ref - (X - X.mean(-1, keepdims=True))).max() < 1e-6
    g = OnnxGraph.from_proto(proto)
    onnx_emit.require_opset(g, 21)
    assert [n.op_type for n in g.model.graph] == ["Constant", "ReduceMean", "Sub"]
    assert not g.model.functions and dict(g.model.opset_imports) == {"": 21}
    rm = list(g.model.graph)[1]
    assert "axes" not in rm.attributes and rm.inputs[1].producer().op_type == "Constant"
    assert np.array_equal(_run(_proto(g), {"x": X})[0], ref)


def test_branch_on_a_linear_that_is_the_graph_output():
    """``Linear(x) + chain(x)``: the sum replaces the linear's output as the graph output and
    takes its name (onnx-ir's replace_all_uses_with, before the Add reads the product)."""
    from rotaq.rewriter.chain import lowrank_chain

    g = _linear_model()
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((16, 4)), rng.standard_normal((4, 48))  # rank 4: W ~ a b
    x = rng.standard_normal((3, 48)).astype(np.float32)
    (ref,) = g.run({"x": x})
    assert g.add_branch("lin", lowrank_chain(a, b)) == "y"
    assert g.output_names == ["y"] and [n.op_type for n in g.model.graph] == [
        "MatMul", "MatMul", "MatMul", "Add"]
    add = list(g.model.graph)[-1]
    assert add.outputs[0] is g.model.graph.outputs[0] and add.inputs[0].name == "y_main"
    (out,) = g.run({"x": x})
    want = ref.astype(np.float64) + x.astype(np.float64) @ b.T @ a.T
    assert np.abs(out - want).max() / np.abs(want).max() < 1e-5
