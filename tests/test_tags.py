"""rotaq.tags: the tags the rewriters stamp on emitted nodes are the ones the readers look for
(the analysis, the TVM lowering of online transforms), on tiny graphs of both IRs."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

import rotaq
from rotaq import tags
from rotaq.backends.tvm_hadamard import lower_kron
from tests.graphs import one_block


def _roles(model) -> Counter:
    return Counter(n.metadata_props.get(tags.ROLE) for n in model.graph.model.graph)


def test_onnx_rotate_tags_transforms_and_tvm_lowers_them():
    res = rotaq.optimize(one_block("onnx"), "rotate", verify=False)
    roles = _roles(res.model)
    # one online Hadamard (before the down projection): Reshape, MatMul, MatMul, Reshape
    assert roles[tags.ROLE_TRANSFORM] == 4
    assert set(roles) == {None, tags.ROLE_TRANSFORM}
    nodes = [n for n in res.model.graph.model.graph if tags.is_transform(n.metadata_props)]
    assert [n.op_type for n in nodes] == ["Reshape", "MatMul", "MatMul", "Reshape"]
    assert all(tags.is_emitted(n.metadata_props) for n in nodes)
    proto = ir.serde.serialize_model(res.model.graph.model)
    assert lower_kron(proto) == 1  # the TVM lowering finds the tagged chain
    assert [n.op_type for n in proto.graph.node].count("RotaqKron") == 1


def test_onnx_quant_tags_name_their_linear():
    res = rotaq.optimize(one_block("onnx"), "w8a8-rotated", verify=False)
    g = res.model.graph.model.graph
    quant = [n for n in g if tags.role(n.metadata_props) == tags.ROLE_QUANT]
    linears = Counter(n.metadata_props.get(tags.QUANT_LINEAR) for n in quant)
    assert set(linears) == {"q", "k", "v", "o", "gate", "up", "down"}  # the head stays float
    assert all(n.metadata_props.get(tags.QUANT) for n in quant)
    # the analysis reads the tags: rotaq's quantized nodes are not matched as float linears
    assert len(one_block("onnx").analysis().linears) == 8
    assert set(res.model.analysis().linears) == {"head"}


def test_fx_rotate_tags_transforms():
    res = rotaq.optimize(one_block("fx"), "rotate", verify=False)
    nodes = res.model.graph.gm.graph.nodes
    roles = Counter(n.meta.get(tags.FX_META) for n in nodes if n.op == "call_function")
    # one online transform (before down_proj): unflatten, matmul, matmul, flatten; its two
    # constant factors (get_attr) carry the tag too
    assert roles[tags.FX_ONLINE] == 4 and set(roles) == {None, tags.FX_ONLINE}
    assert sum(n.meta.get(tags.FX_META) == tags.FX_ONLINE for n in nodes) == 6


def test_metadata_helpers():
    meta = tags.cache_metadata(30, 3, 64)
    assert meta == {"rotaq.kv_cache": "1", "rotaq.num_layers": "30", "rotaq.kv_heads": "3",
                    "rotaq.head_dim": "64"}
    src = tags.source_fields({**meta, tags.TOKENIZER: "t/", "other.key": "x"})
    assert src == {"kv_cache": "1", "num_layers": "30", "kv_heads": "3", "head_dim": "64",
                   "tokenizer": "t/"}
    assert not tags.is_emitted({}) and not tags.is_transform({tags.ROLE: tags.ROLE_QUANT})
