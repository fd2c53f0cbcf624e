"""The bad-input corpus (tests/badinputs.py): every case exits with its expected code, never 1;
an error is one stderr line without a traceback naming the problem; inputs are unchanged; a
crafted file never runs code."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.badinputs import MARKER, Case, cases, generate, run_cli

ROOT = Path(__file__).resolve().parents[1]
CASES = cases()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("badinputs")
    generate(d)
    return d


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(corpus, case: Case):
    before = {f: _digest(corpus / f) for f in case.inputs}
    code, _out, err = run_cli(case.argv(corpus), cwd=corpus / case.cwd if case.cwd else None)
    assert code != 1, err
    assert code in case.codes, (code, err)
    assert "Traceback" not in err
    if code != 0:
        line = err.strip()
        assert "\n" not in line, err  # one line, nothing from torch or ORT before it
        assert line.startswith(("rotaq: error:", "rotaq: verification failed:")), line
        assert case.phrase.lower() in line.lower(), line
    for f, digest in before.items():
        assert _digest(corpus / f) == digest, f"{f} was modified"
    for f in case.absent:
        assert not (corpus / f).exists(), f"{f} exists"
    assert not list(corpus.glob(".rotaq-*"))  # no temporary leftovers


def test_crafted_pickle_in_a_subprocess(corpus):
    """The CLI itself (a fresh interpreter, as a user runs it) on the crafted archive."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("evil-weight.pt2", "evil-inputs.pt2"):
        r = subprocess.run([sys.executable, "-m", "rotaq.cli", "inspect", str(corpus / name)],
                           capture_output=True, text=True, env=env, timeout=300, check=False)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "not plain tensor data" in r.stderr
        assert not (corpus / MARKER).exists()


def test_positional_cnn_rotate_exact(corpus, tmp_path):
    """issue 10: a .pt2 exported with positional inputs rewrites exactly (vs the original)."""
    import torch

    import rotaq

    out = tmp_path / "rot.pt2"
    res = rotaq.optimize(str(corpus / "cnn.pt2"), "rotate")
    rep = res.save(str(out))
    # online mode: the classifier (the linear feeding the output) is the head, kept as it is
    assert rep["passes"][0]["stats"]["linears_rotated"] == 1
    assert rep["verify"]["torch"] < 1e-5
    orig, new = torch.export.load(corpus / "cnn.pt2"), torch.export.load(out)
    assert len(new.graph_signature.user_inputs) == 1 and new.example_inputs[0]  # positional
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))  # other inputs
    with torch.no_grad():
        y0, y1 = orig.module()(x).numpy(), new.module()(x).numpy()
    assert np.abs(y1 - y0).max() / np.abs(y0).max() < 1e-4
    w0 = orig.state_dict["3.weight"].detach().numpy()  # the first Linear's weight, 32 x 288
    assert any(v.shape == w0.shape and np.abs(v.detach().numpy() - w0).max() > 1e-3
               for v in new.state_dict.values())  # the rotated weight W K is there


def test_sigterm_during_export_leaves_nothing(tmp_path):
    """SIGTERM while the ONNX exporter runs: the hidden export folder is removed."""
    d = tmp_path / "out"
    d.mkdir()
    script = ("import sys, torch, rotaq\n"
              "from tests.tiny import build\n"
              "m, x = build('llama')\n"
              "rotaq.load(m, x).save(sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(d / "m.onnx")], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(d.glob(".rotaq-export-*")):
        time.sleep(0.05)
    assert list(d.glob(".rotaq-export-*")), "the export never started"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert os.listdir(d) == [], os.listdir(d)


def test_positional_dynamic_two_inputs(tmp_path):
    """Positional inputs with a dynamic batch plus a fixed-size second input (not sliced)."""
    import torch

    import rotaq

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

        def forward(self, x, scale):
            return self.b(torch.relu(self.a(x))) * scale

    torch.manual_seed(0)
    m = M().eval()
    sc = torch.randn(16)
    ep = torch.export.export(m, (torch.randn(4, 16), sc),
                             dynamic_shapes=({0: torch.export.Dim.AUTO}, None))
    torch.export.save(ep, tmp_path / "m.pt2")
    model = rotaq.load(str(tmp_path / "m.pt2"))
    assert {k: v.shape for k, v in model.sample_inputs.items()} == {"x": (1, 16), "scale": (16,)}
    rep = rotaq.optimize(model, "rotate").save(str(tmp_path / "r.pt2"))
    assert rep["passes"][0]["stats"]["linears_rotated"] == 2
    x = torch.randn(7, 16)  # another batch size: the batch stayed dynamic
    with torch.no_grad():
        y0, y1 = m(x, sc), torch.export.load(tmp_path / "r.pt2").module()(x, sc)
    assert float((y1 - y0).abs().max() / y0.abs().max()) < 1e-4
