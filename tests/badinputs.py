"""A corpus of bad inputs for the ``rotaq`` command, generated into a folder (nothing large is
kept in git): corrupt, truncated and crafted model files, bad recipes, bad output paths.

``generate(folder)`` writes every file and returns the cases; ``run_cli(argv, cwd)`` runs
``rotaq.cli.main`` in this process and returns (exit code, stdout, stderr), stderr captured at
the file-descriptor level so torch's and ONNX Runtime's own output is seen too. Used by
``tests/test_badinputs.py`` and ``benchmarks/badinputs_table.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MARKER = "PWNED"  # a crafted file that runs code would create this file in the corpus folder


@dataclass
class Case:
    """``args`` are CLI arguments with ``{d}`` for the corpus folder; ``codes`` the accepted exit
    codes (exactly one for a rotaq error); ``phrase`` a part of the stderr line (lowercase
    compare) for an error; ``inputs`` the files that must be byte-identical afterwards;
    ``absent`` paths (relative to the folder) that must not exist afterwards."""

    name: str
    args: list[str]
    codes: tuple[int, ...] = (2,)
    phrase: str = ""
    inputs: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    cwd: str = ""
    note: str = ""

    def argv(self, d: Path) -> list[str]:
        return [a.format(d=d) for a in self.args]


# ---- models ---------------------------------------------------------------------------------
def _mlp_module():
    import torch

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x)))

    torch.manual_seed(0)
    return MLP().eval()


class _Evil:
    """Unpickling this creates the marker file (stands for any code an attacker picks)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def _rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], Any]) -> None:
    """Copy zip ``src`` to ``dst`` with ``edit(name, data)`` applied to every entry: it returns
    the new data, None to drop the entry, or (name, data) to rename it as well."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            name = info.filename
            if isinstance(data, tuple):
                name, data = data
            if data is not None:
                zout.writestr(name, data)


def _json_edit(suffix: str, change: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith(suffix):
            obj = json.loads(data)
            change(obj)
            return json.dumps(obj).encode()
        return data
    return edit


def _first(obj, pred):
    """The first dict in ``obj`` (depth first) for which ``pred`` holds."""
    stack = [obj]
    while stack:
        o = stack.pop(0)
        if isinstance(o, dict):
            if pred(o):
                return o
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    raise LookupError("no such entry")


def _pt2_files(d: Path) -> None:
    """Real exported programs (an MLP; a CNN exported with a positional input) and crafted
    copies that run code in stock ``torch.export.load`` or in the module it returns."""
    import torch

    mlp = _mlp_module()
    x = torch.randn(2, 8, 16)
    torch.export.save(torch.export.export(mlp, (x,)), d / "mlp.pt2")
    torch.export.save(torch.export.export(mlp, (), {"x": x}), d / "mlp-kw.pt2")
    dyn = {"x": {0: torch.export.Dim.AUTO}}
    torch.export.save(torch.export.export(mlp, (), {"x": x}, dynamic_shapes=dyn),
                      d / "mlp-dyn.pt2")
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 16)).eval()
    torch.export.save(torch.export.export(cnn, (torch.randn(2, 3, 8, 8),)), d / "cnn.pt2")
    marker = str(d / MARKER)

    # a weight entry replaced by a pickle (torch reads use_pickle entries with weights_only=False)
    def weight(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            next(iter(cfg["config"].values()))["use_pickle"] = True
            return json.dumps(cfg).encode()
        if name.endswith("data/weights/weight_0"):
            return pickle.dumps(_Evil(marker), protocol=2)
        return data
    _rewrite_zip(d / "mlp.pt2", d / "evil-weight.pt2", weight)
    # the sample inputs: weights_only=True fails, torch retries with weights_only=False
    _rewrite_zip(d / "mlp.pt2", d / "evil-inputs.pt2", lambda n, b: pickle.dumps(
        _Evil(marker), protocol=2) if n.endswith("sample_inputs/model.pt") else b)
    # a second program under an odd record name, with code-running sample inputs: torch loads
    # every record under models/ (named by cutting 7 + 5 characters) and its sample inputs

    with zipfile.ZipFile(d / "mlp.pt2") as z:
        root = z.namelist()[0].split("/")[0]
        program = z.read(f"{root}/models/model.json")
        entries = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(d / "evil-second.pt2", "w", zipfile.ZIP_STORED) as z:
        for n, data in entries.items():
            z.writestr(n, data)
            if n.endswith("data/weights/model_weights_config.json"):
                z.writestr(n.replace("model_weights", "xyzzy_weights"), data)
            if n.endswith("data/constants/model_constants_config.json"):
                z.writestr(n.replace("model_constants", "xyzzy_constants"), data)
        z.writestr(f"{root}/models/xyzzy.bin!", program)
        z.writestr(f"{root}/data/sample_inputs/xyzzy.pt", pickle.dumps(_Evil(marker), protocol=2))
    # the sample inputs under an upper-case name: torch's zip lookup ignores case
    _rewrite_zip(d / "mlp.pt2", d / "evil-case.pt2", lambda n, b: (
        n.replace("model.pt", "MODEL.pt"), pickle.dumps(_Evil(marker), protocol=2))
        if n.endswith("sample_inputs/model.pt") else b)
    # a shape expression: torch hands it to sympy.sympify, which evals it

    def expr(prog: dict) -> None:
        e = _first(prog, lambda o: isinstance(o.get("expr_str"), str))
        e["expr_str"] = f"__import__('os').system(\"touch '{marker}'\") or s0"
    _rewrite_zip(d / "mlp-dyn.pt2", d / "evil-expr.pt2", _json_edit("models/model.json", expr))
    # a node target: any callable reachable from `torch.` is accepted and called by the graph

    def target(prog: dict) -> None:
        node = _first(prog, lambda o: "target" in o and "inputs" in o and "outputs" in o)
        node["target"] = "torch.os.system"
        node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch '{marker}'"},
                           "kind": 1}]
    _rewrite_zip(d / "mlp.pt2", d / "evil-target.pt2", _json_edit("models/model.json", target))
    # a keyword input name: pasted unescaped into the forward() torch.fx generates

    def kwname(prog: dict) -> None:
        sig = _first(prog, lambda o: isinstance(o.get("in_spec"), str))
        spec = json.loads(sig["in_spec"])
        node = _first(spec, lambda o: o.get("type") == "builtins.dict")
        node["context"] = json.dumps(
            [f"x': __import__('os').system('touch {marker}'), 'y"])
        sig["in_spec"] = json.dumps(spec)
    _rewrite_zip(d / "mlp-kw.pt2", d / "evil-kwname.pt2", _json_edit("models/model.json", kwname))
    # a well-formed archive missing a weight record (torch logs a traceback, then fails)
    _rewrite_zip(d / "mlp.pt2", d / "broken-program.pt2",
                 lambda n, b: None if n.endswith("data/weights/weight_1") else b)
    # not an exported program: a zip with junk, and a torch.save'd state dict named .pt2
    with zipfile.ZipFile(d / "junk.pt2", "w") as z:
        z.writestr("junk/readme.txt", "not a model")
    torch.save(mlp.state_dict(), d / "state-dict.pt2")


def _onnx_mlp(dtype: int = 1, custom: bool = False, relu_only: bool = False):
    """x [1, 8, 16] -> MatMul(16x32) + b -> Relu -> MatMul(32x16): hand-built, shape-inferred."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    np_type = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}.get(dtype)

    def init(name: str, shape: tuple[int, ...]):
        a = rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[0])
        if dtype == TensorProto.BFLOAT16:
            t = helper.make_tensor(name, dtype, shape, a.flatten().tolist())
            return t
        return numpy_helper.from_array(a.astype(np_type), name)

    x = helper.make_tensor_value_info("x", dtype, [1, 8, 16])
    y = helper.make_tensor_value_info("y", dtype, [1, 8, 16])
    if relu_only:
        nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])]
        inits = []
    else:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
                 helper.make_node("Add", ["h", "b1"], ["hb"]),
                 helper.make_node("Relu", ["hb"], ["r"]),
                 helper.make_node("MatMul", ["r", "w2"], ["y"])]
        inits = [init("w1", (16, 32)), init("b1", (32,)), init("w2", (32, 16))]
    opsets = [helper.make_opsetid("", 18)]
    if custom:
        nodes[2] = helper.make_node("FancyRelu", ["hb"], ["r"], domain="com.example")
        opsets.append(helper.make_opsetid("com.example", 1))
    g = helper.make_graph(nodes, "mlp", [x], [y], inits)
    m = helper.make_model(g, opset_imports=opsets, ir_version=9)
    return onnx.shape_inference.infer_shapes(m)


def _onnx_files(d: Path) -> None:
    import onnx
    from onnx import TensorProto

    onnx.save(_onnx_mlp(), d / "mlp.onnx")
    onnx.save(_onnx_mlp(TensorProto.FLOAT16), d / "fp16.onnx")
    onnx.save(_onnx_mlp(TensorProto.BFLOAT16), d / "bf16.onnx")
    onnx.save(_onnx_mlp(custom=True), d / "custom-op.onnx")
    onnx.save(_onnx_mlp(relu_only=True), d / "no-linear.onnx")
    ext = d / "ext"
    ext.mkdir()
    onnx.save(_onnx_mlp(), ext / "missing.onnx", save_as_external_data=True,
              location="missing.onnx.data", size_threshold=0)
    os.unlink(ext / "missing.onnx.data")
    for name, loc in (("traversal.onnx", "../../../../../../etc/passwd"),
                      ("symlink.onnx", "symlink.onnx.data")):
        m = _onnx_mlp()
        onnx.save(m, ext / name, save_as_external_data=True, location=f"{name}.tmp",
                  size_threshold=0)
        m = onnx.load(ext / name, load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = loc
        onnx.save(m, ext / name)
        if name == "symlink.onnx":  # the data lives outside the model's folder
            outside = d / "outside"
            outside.mkdir()
            os.replace(ext / f"{name}.tmp", outside / "weights.bin")
            os.symlink(outside / "weights.bin", ext / loc)
        else:
            os.unlink(ext / f"{name}.tmp")


def _plain_files(d: Path) -> None:
    rng = np.random.default_rng(1)
    good_onnx = (d / "mlp.onnx").read_bytes()
    good_pt2 = (d / "mlp.pt2").read_bytes()
    for ext, good in (("onnx", good_onnx), ("pt2", good_pt2)):
        (d / f"empty.{ext}").write_bytes(b"")
        (d / f"random.{ext}").write_bytes(rng.bytes(4096))
        (d / f"truncated.{ext}").write_bytes(good[: len(good) // 2])
    recipes = {
        "tol-abc.json": {"name": "t", "tolerance": "abc", "passes": [{"pass": "rotate"}]},
        "misspelled.json": {"name": "t", "tolerence": 1e-4, "passes": [{"pass": "rotate"}]},
        "seed-float.json": {"name": "t", "passes": [{"pass": "rotate", "seed": 1.5}]},
    }
    for name, body in recipes.items():
        (d / name).write_text(json.dumps(body))
    (d / "out-dir.onnx").mkdir()
    shadow = d / "shadow"
    (shadow / "rotate").mkdir(parents=True)  # a folder named like the built-in recipe
    (shadow / "w8a8").write_text("not json")  # and a file


def generate(d: Path) -> list[Case]:
    """Write the corpus into ``d`` and return its cases."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    _pt2_files(d)
    _onnx_files(d)
    _plain_files(d)
    return cases()


def cases() -> list[Case]:
    c: list[Case] = []
    for ext in ("onnx", "pt2"):
        for kind, phrase in (("empty", ""), ("random", ""), ("truncated", "")):
            c.append(Case(f"{kind} .{ext}", ["inspect", f"{{d}}/{kind}.{ext}"],
                          phrase=f"{kind}.{ext}", inputs=[f"{kind}.{ext}"]))
    c += [
        Case("ONNX, external data missing", ["inspect", "{d}/ext/missing.onnx"],
             phrase="external data", inputs=["ext/missing.onnx"]),
        Case("ONNX, external data path ../../etc/passwd", ["inspect", "{d}/ext/traversal.onnx"],
             phrase="traversal.onnx", inputs=["ext/traversal.onnx"]),
        Case("ONNX, external data a symlink out of the folder", ["inspect",
             "{d}/ext/symlink.onnx"], phrase="symlink.onnx", inputs=["ext/symlink.onnx"]),
        Case(".pt2 that is a zip of junk", ["inspect", "{d}/junk.pt2"],
             phrase="not a torch.export archive", inputs=["junk.pt2"]),
        Case(".pt2 that is a torch.save state dict", ["inspect", "{d}/state-dict.pt2"],
             phrase="not a torch.export archive", inputs=["state-dict.pt2"]),
        Case(".pt2 whose program torch cannot deserialize", ["inspect",
             "{d}/broken-program.pt2"], phrase="not a readable ExportedProgram",
             inputs=["broken-program.pt2"]),
        Case(".pt2, a weight replaced by a code-running pickle", ["inspect",
             "{d}/evil-weight.pt2"], phrase="not plain tensor data",
             inputs=["evil-weight.pt2"], absent=[MARKER]),
        Case(".pt2, sample inputs replaced by a code-running pickle", ["inspect",
             "{d}/evil-inputs.pt2"], phrase="not plain tensor data",
             inputs=["evil-inputs.pt2"], absent=[MARKER]),
        Case(".pt2, a second program (odd record name) with code-running sample inputs",
             ["inspect", "{d}/evil-second.pt2"], phrase="not plain tensor data",
             inputs=["evil-second.pt2"], absent=[MARKER]),
        Case(".pt2, code-running sample inputs under an upper-case record name",
             ["inspect", "{d}/evil-case.pt2"], phrase="not plain tensor data",
             inputs=["evil-case.pt2"], absent=[MARKER]),
        Case(".pt2, Python code in a shape expression", ["inspect", "{d}/evil-expr.pt2"],
             phrase="symbolic shape expression", inputs=["evil-expr.pt2"], absent=[MARKER]),
        Case(".pt2, a node calling torch.os.system", ["optimize", "{d}/evil-target.pt2", "-o",
             "{d}/o1.pt2"], phrase="not a registered operator", inputs=["evil-target.pt2"],
             absent=[MARKER, "o1.pt2"]),
        Case(".pt2, code in a keyword input name", ["optimize", "{d}/evil-kwname.pt2", "-o",
             "{d}/o2.pt2"], phrase="not an identifier", inputs=["evil-kwname.pt2"],
             absent=[MARKER, "o2.pt2"]),
        Case("bench on random bytes", ["bench", "{d}/random.onnx", "--tokens", "1"],
             phrase="random.onnx", inputs=["random.onnx"]),
        Case('recipe "tolerance": "abc"', ["optimize", "{d}/mlp.onnx", "--recipe",
             "{d}/tol-abc.json", "-o", "{d}/o3.onnx"], phrase="tolerance",
             inputs=["tol-abc.json"], absent=["o3.onnx"]),
        Case('recipe key misspelled ("tolerence")', ["optimize", "{d}/mlp.onnx", "--recipe",
             "{d}/misspelled.json", "-o", "{d}/o4.onnx"], phrase="tolerence",
             inputs=["misspelled.json"], absent=["o4.onnx"]),
        Case("recipe option of the wrong JSON type (seed 1.5)", ["optimize", "{d}/mlp.onnx",
             "--recipe", "{d}/seed-float.json", "-o", "{d}/o14.onnx"], phrase="expects int",
             absent=["o14.onnx"]),
        Case("-o names an existing directory", ["optimize", "{d}/mlp.onnx", "-o",
             "{d}/out-dir.onnx"], phrase="is a directory", inputs=["mlp.onnx"]),
        Case("inspect --plot into a missing folder", ["inspect", "{d}/mlp.pt2", "--stats",
             "--plot", "{d}/nodir/p.png"], phrase="nodir", inputs=["mlp.pt2"],
             absent=["nodir"]),
        Case("ONNX input, -o out.pt2", ["optimize", "{d}/mlp.onnx", "-o", "{d}/o5.pt2"],
             phrase=".pt2", inputs=["mlp.onnx"], absent=["o5.pt2"]),
        Case("graph without a linear: rotate", ["optimize", "{d}/no-linear.onnx", "-o",
             "{d}/o6.onnx"], phrase="no linear found", inputs=["no-linear.onnx"],
             absent=["o6.onnx"]),
        Case("graph without a linear: w8a8-rotated", ["optimize", "{d}/no-linear.onnx",
             "--recipe", "w8a8-rotated", "-o", "{d}/o7.onnx"], phrase="no linear found",
             inputs=["no-linear.onnx"], absent=["o7.onnx"]),
        Case("--set rank=0", ["optimize", "{d}/mlp.onnx", "--recipe", "lowrank", "--set",
             "rank=0", "-o", "{d}/o8.onnx"], phrase="rank", absent=["o8.onnx"]),
        Case("--set bits=3 (no such option)", ["optimize", "{d}/mlp.onnx", "--recipe",
             "w8a8-rotated", "--set", "bits=3", "-o", "{d}/o9.onnx"], phrase="w_bits",
             absent=["o9.onnx"]),
        Case("folder and file named like built-in recipes in the cwd", ["optimize",
             "{d}/mlp.onnx", "--recipe", "rotate", "-o", "{d}/o10.onnx"], codes=(0,),
             cwd="shadow", inputs=["mlp.onnx"], note="the built-in wins"),
        Case("custom-domain op, rotate", ["optimize", "{d}/custom-op.onnx", "-o",
             "{d}/o11.onnx"], codes=(0, 2, 3), inputs=["custom-op.onnx"]),
        Case("bf16 ONNX, rotate", ["optimize", "{d}/bf16.onnx", "-o", "{d}/o12.onnx"],
             codes=(0, 2, 3), inputs=["bf16.onnx"]),
        Case("fp16 ONNX, rotate", ["optimize", "{d}/fp16.onnx", "-o", "{d}/o13.onnx"],
             codes=(0, 2, 3), inputs=["fp16.onnx"]),
        Case("CNN .pt2 exported with a positional input, rotate", ["optimize", "{d}/cnn.pt2",
             "-o", "{d}/cnn-rot.pt2"], codes=(0,), inputs=["cnn.pt2"]),
        Case(".pt2 written by rotaq reads back", ["inspect", "{d}/cnn-rot.pt2"], codes=(0,)),
        Case(".pt2 with dynamic shapes (sympy expressions) loads", ["inspect",
             "{d}/mlp-dyn.pt2"], codes=(0,), inputs=["mlp-dyn.pt2"]),
        Case(".pt2 with keyword inputs loads", ["inspect", "{d}/mlp-kw.pt2"], codes=(0,),
             inputs=["mlp-kw.pt2"]),
    ]
    return c


# ---- running --------------------------------------------------------------------------------
def run_cli(argv: list[str], cwd: str | os.PathLike | None = None) -> tuple[int, str, str]:
    """``rotaq.cli.main(argv)`` in this process: (exit code, stdout, stderr)."""
    from rotaq.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    here = os.getcwd()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                if cwd:
                    os.chdir(cwd)
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse
                    code = e.code if isinstance(e.code, int) else 2
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.chdir(here)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            root.handlers[:] = handlers  # main's logging.basicConfig wrote to ``err``
            root.setLevel(level)
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read()
