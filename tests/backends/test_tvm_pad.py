"""TVM compile pads only the token axis of token inputs: a model with token ids and a float input
of its own length compiles through `rotaq compile --backend tvm`, runs padded and unpadded, and
matches ONNX Runtime; a model without token inputs compiles once with static shapes."""

import json

import numpy as np
import onnx
import pytest
import torch

import rotaq
from rotaq.cli import main
from rotaq.errors import RotaqError

tvm = pytest.importorskip("tvm", reason="the TVM extra is not installed (pip install rotaq[tvm])")
from rotaq.backends import tvm as tb
from rotaq.backends.tvm_import import pad_axes, static_shapes

FEAT_LEN, WIDTH, BUCKET = 3, 32, 8


class TokensAndFeatures(torch.nn.Module):
    """Per-token logits from token ids plus a summary of a float input of a fixed length (as a
    decoder reading ``encoder_hidden_states``): padding the tokens cannot change earlier ones."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(64, WIDTH)
        self.feat = torch.nn.Linear(WIDTH, WIDTH)
        self.head = torch.nn.Linear(WIDTH, 64)

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        ctx = self.feat(features).mean(dim=1, keepdim=True)
        return self.head(torch.relu(self.emb(input_ids) + ctx))


class FeaturesOnly(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(WIDTH, 16)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.lin(features).softmax(-1)


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 64, (1, 6), generator=g),
              "features": torch.randn(1, FEAT_LEN, WIDTH, generator=g)}
    path = tmp_path_factory.mktemp("pad") / "two.onnx"
    rotaq.load(TokensAndFeatures().eval(), inputs, ir="onnx").save(str(path))
    proto = onnx.load(str(path))  # the exporter left the feature length symbolic: fix it
    feat = next(i for i in proto.graph.input if i.name == "features")
    feat.type.tensor_type.shape.dim[1].dim_value = FEAT_LEN
    onnx.save(proto, str(path))
    return path


def test_default_axes_and_shapes(two_inputs):
    proto = onnx.load(str(two_inputs), load_external_data=False)
    axes = pad_axes(proto)
    assert axes == {"input_ids": 1}
    shapes = static_shapes(proto, BUCKET, axes, {})
    assert shapes == {"input_ids": [1, BUCKET], "features": [1, FEAT_LEN, WIDTH]}
    assert pad_axes(proto, {"input_ids": None}) == {}
    with pytest.raises(RotaqError, match="no input 'ids'"):
        pad_axes(proto, {"ids": 1})
    with pytest.raises(RotaqError, match="fixed at 32"):
        pad_axes(proto, {"features": 2})
    # a symbolic non-token dim takes its size from the sample inputs, or must be declared
    proto.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "frames"
    assert static_shapes(proto, 4, axes, {"features": (1, 7, WIDTH)})["features"] == [1, 7, 32]
    with pytest.raises(RotaqError, match="--pad-axis features:1"):
        static_shapes(proto, BUCKET, axes, {})
    # torch's exporter writes some static sizes as numeric symbols (Whisper's mel bins)
    proto.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "3"
    assert static_shapes(proto, 4, axes, {})["features"] == [1, 3, 32]
    # an input sharing the token axis' symbol is padded with it
    proto.graph.input[1].type.tensor_type.shape.dim[1].dim_param = \
        proto.graph.input[0].type.tensor_type.shape.dim[1].dim_param
    assert pad_axes(proto) == {"input_ids": 1, "features": 1}


def test_compile_token_and_float_input(two_inputs, tmp_path, capsys):
    art = tmp_path / "art"
    assert main(["compile", str(two_inputs), "--backend", "tvm", "--tokens", str(BUCKET),
                 "-o", str(art), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["pad_axes"] == {"input_ids": 1}
    assert meta["buckets"][str(BUCKET)]["input_shapes"] == {
        "input_ids": [1, BUCKET], "features": [1, FEAT_LEN, WIDTH]}
    ref, model = rotaq.load(str(two_inputs)), tb.load(str(art))
    assert model.sample_inputs["features"].shape == (1, FEAT_LEN, WIDTH)
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((2, FEAT_LEN, WIDTH)).astype(np.float32)
    for n in (BUCKET, 5, 1):  # 5 and 1 run padded on the 8-token library
        feeds = {"input_ids": rng.integers(0, 64, (2, n)).astype(np.int64), "features": feats}
        (a,), (b,) = model.graph.run(feeds), ref.graph.run(feeds)
        assert a.shape == b.shape == (2, n, 64)
        assert _rel(a, b) < 1e-4
    bad = {"input_ids": np.ones((1, 4), np.int64), "features": feats[:1, :2]}
    with pytest.raises(RotaqError, match="compiled for \\[1, 3, 32\\]"):
        model.graph.run(bad)


def test_compile_without_token_input(tmp_path):
    torch.manual_seed(0)
    feats = torch.randn(1, 5, WIDTH)
    m = rotaq.load(FeaturesOnly().eval(), {"features": feats}, ir="onnx")
    meta = tb.compile_tvm(m, str(tmp_path / "art"), tokens=[1, 16], progress=False)
    assert meta["tokens"] == [] and meta["pad_axes"] == {} and list(meta["buckets"]) == ["0"]
    model = tb.load(str(tmp_path / "art"))
    x = {"features": np.random.default_rng(2).standard_normal((1, 5, WIDTH)).astype(np.float32)}
    (a,), (b,) = model.graph.run(x), m.graph.run(x)
    assert a.shape == (1, 5, 16) and _rel(a, b) < 1e-4
