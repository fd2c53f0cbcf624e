"""The .pt2 pre-check: what torch writes for ordinary programs passes, code does not."""

import io
import os
import pickle

import pytest
import torch

from rotaq.errors import LoadError
from rotaq.rewriter.pt2_safe import _check_expr, _check_pickle, check_pt2


class _Features(torch.nn.Module):
    """no_grad and autocast regions (higher-order ops), symbolic sizes, SDPA, sym_max."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        with torch.no_grad():
            y = self.lin(x)
        b, t, c = x.shape
        q = y.view(b, t // 2, 2, c).transpose(1, 2).reshape(b * 2, t // 2, c)
        z = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w = self.lin(z)
        return w.float().sum() + torch.sym_max(b, 3) + x.shape[1] / 3


def test_ordinary_program_passes(tmp_path):
    dyn = {"x": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}}
    ep = torch.export.export(_Features(), (), {"x": torch.randn(2, 8, 16)}, dynamic_shapes=dyn)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"wrap_with_set_grad_enabled", "wrap_with_autocast"} <= targets
    torch.export.save(ep, tmp_path / "f.pt2")
    check_pt2(str(tmp_path / "f.pt2"))  # raises if refused


@pytest.mark.parametrize("expr", [
    "Symbol('s0', positive=True, integer=True)", "Mul(Integer(16), FloorDiv(s0, Integer(2)))",
    "Max(2, s0) - 1", "Float('0.5', precision=53)", "IntTrueDiv(s27, 3)", "-int_oo"])
def test_shape_expressions_torch_writes(expr):
    _check_expr("f.pt2", expr)


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "eval(chr(49))", "s0.__class__", "Symbol('os')",
    "Symbol(chr(1))", "lambda: 0", "getattr(s0, 'x')", "[s0][0]", "exec"])
def test_shape_expressions_with_code_refused(expr):
    with pytest.raises(LoadError, match="not plain arithmetic"):
        _check_expr("f.pt2", expr)


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("zipped", [True, False])
def test_tensor_pickles_pass(zipped):
    for obj in (((torch.randn(3),), {"a": torch.ones(2, dtype=torch.int64)}),
                torch.nn.Parameter(torch.randn(3))):
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=zipped)
        _check_pickle("f.pt2", "r", buf.getvalue())


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_code_pickles_refused(protocol):
    with pytest.raises(LoadError, match="not plain tensor data"):
        _check_pickle("f.pt2", "r", pickle.dumps(_Evil(), protocol=protocol))
    buf = io.BytesIO()
    torch.save({"w": _Evil()}, buf, pickle_protocol=protocol)
    with pytest.raises(LoadError, match="not plain tensor data"):
        _check_pickle("f.pt2", "r", buf.getvalue())
