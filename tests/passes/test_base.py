"""The Pass base class: option coercion from type hints, requirements, honest ``modified``,
errors that name the pass, the registry, and the pass history saved with a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import pytest

import rotaq
from rotaq.errors import MatchError, RewriteError, RotaqError
from rotaq.passes.base import Pass, PassResult, make_pass, pass_names, register
from rotaq.recipe import Recipe
from tests.graphs import check_pass, one_block, one_linear


@dataclass(frozen=True)
class Scale(Pass):
    """Test pass: multiplies every linear's weight by ``factor`` (1.0: nothing to do, yet it
    claims to have modified the model, so the base class must correct it)."""

    name: ClassVar[str] = "test-scale"
    factor: float = 1.0
    mode: Literal["all", "first"] = "all"
    limit: int | None = None
    only: tuple[str, ...] = ()
    fail: str = ""
    after: str = ""

    def requires(self) -> tuple[str, ...]:
        return ("linears",) + ((f"after:{self.after}",) if self.after else ())

    def call(self, model) -> PassResult:
        if self.fail:
            raise RewriteError(self.fail)
        g = model.graph
        keys = list(model.analysis().linears)[: 1 if self.mode == "first" else self.limit]
        for k in keys:
            if self.only and k not in self.only:
                continue
            if self.factor != 1.0:
                w, b = g.get_linear(k)
                g.set_linear(k, w * self.factor, b)
        return PassResult(model, True, {"linears": len(keys)})


@pytest.fixture(autouse=True)
def registered():
    """test-scale is registered for this module's tests only."""
    from rotaq.passes import base

    register(Scale)
    yield
    base._REGISTRY.pop("test-scale", None)


def test_coercion_from_type_hints():
    p = make_pass("test-scale", {"factor": "2", "mode": "first", "limit": "none",
                                 "only": "a, b"})
    assert (p.factor, p.mode, p.limit, p.only) == (2.0, "first", None, ("a", "b"))
    assert make_pass("test-scale", {"limit": "3"}).limit == 3
    assert make_pass("test-scale", {"limit": 3, "factor": 2}).factor == 2.0  # int -> float
    for opts, msg in [({"mode": "some"}, "option mode expects one of all, first, got 'some'"),
                      ({"limit": "x"}, "option limit expects int or none"),
                      ({"factor": True}, "option factor expects float, got True"),
                      ({"only": 5}, "option only expects a comma-separated list of str")]:
        with pytest.raises(RotaqError, match=msg):
            make_pass("test-scale", opts)
    # built directly in Python, the same checks apply
    with pytest.raises(RotaqError, match="pass 'test-scale': option mode expects"):
        Scale(mode="x")


def test_unknown_options_list_the_valid_ones():
    with pytest.raises(RotaqError, match=r"has no option factr \(options: after, factor, fail, "
                                         r"limit, mode, only\)"):
        make_pass("test-scale", {"factr": 2})
    with pytest.raises(RotaqError, match=r"option 'w_bit' matches no pass .*quantize: .*w_bits"):
        Recipe.load("w8a8").with_options({"w_bit": 4})
    with pytest.raises(RotaqError, match=r"unknown pass 'nope' \(known: .*rotate"):
        make_pass("nope", {})
    assert {"rotate", "quantize", "lowrank", "structured", "kron-transform",
            "test-scale"} <= set(pass_names())


def test_register_refuses_a_class_that_is_not_a_pass():
    with pytest.raises(TypeError, match="not a Pass subclass"):
        register(type("X", (), {"name": "x"}))


@pytest.mark.parametrize("ir", ["onnx", "fx"])
def test_modified_is_computed_from_the_graph(ir):
    model = one_linear(ir)
    res = Scale(factor=1.0)(model.clone())  # claims True, edits nothing
    assert res.modified is False
    res, err = check_pass(Scale(factor=1.0), model, modified=False)
    res, err = check_pass(Scale(factor=2.0), model, max_rel_error=1.5)
    assert res.modified is True and 0.5 < err < 1.5
    # a pass that edits one of several linears
    block = one_block(ir)
    first = next(iter(block.analysis().linears))
    assert Scale(factor=3.0, only=(first,))(block.clone()).modified is True
    assert Scale(factor=3.0, only=("no-such",))(block.clone()).modified is False


def test_errors_name_the_pass_and_keep_their_class():
    with pytest.raises(RewriteError, match=r"^test-scale: boom$"):
        Scale(fail="boom")(one_linear("onnx"))
    with pytest.raises(RewriteError, match=r"^quantize: the model's only linear is its head"):
        rotaq.optimize(one_linear("onnx"), "quantize")


def test_requirements():
    model = one_linear("onnx")
    with pytest.raises(RotaqError, match="test-scale: must run after rotate"):
        Scale(after="rotate")(model.clone())
    # quantize records itself; rotate must run before it (the quantized weights are no longer
    # plain linears a rotation can fold into)
    res = rotaq.optimize(one_block("onnx"), "quantize", verify=False)
    assert res.model.source["passes"] == "quantize"
    with pytest.raises(RotaqError, match="rotate: must run before quantize, which this model "
                                         r"has already been through \(passes so far: quantize\)"):
        make_pass("rotate", {})(res.model)

    @dataclass(frozen=True)
    class Needs(Pass):
        name: ClassVar[str] = "test-needs"
        req: str = "residual"

        def requires(self) -> tuple[str, ...]:
            return (self.req,)

        def call(self, model) -> PassResult:
            return PassResult(model, False)

    with pytest.raises(MatchError, match="test-needs: no residual stream was found"):
        Needs()(one_linear("onnx"))
    with pytest.raises(MatchError, match="test-needs: needs a pre-norm model"):
        Needs(req="pre-norm")(one_linear("fx"))
    with pytest.raises(ValueError, match="unknown requirement 'tall'"):
        Needs(req="tall")(one_linear("fx"))
    assert Needs()(one_block("fx")).modified is False


def test_pass_history_is_saved_with_the_model(tmp_path):
    res = rotaq.optimize(one_block("onnx"), "rotate")
    assert res.model.source["passes"] == "rotate"
    path = str(tmp_path / "r.onnx")
    res.model.save(path)
    back = rotaq.load(path)
    assert back.source["passes"] == "rotate"
    q = rotaq.optimize(back, "w4a16", verify=False)
    assert q.model.source["passes"] == "rotate,quantize"
    feeds = res.model.sample_inputs
    np.testing.assert_allclose(back.run(feeds)[0], res.model.run(feeds)[0], rtol=1e-5, atol=1e-6)
