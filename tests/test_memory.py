"""Peak memory of rotation: it must grow with one block, not with the model (issue 12).

A synthetic Llama of ~50M parameters (~200 MB in float32, written by rotaq.synthetic as a
Hugging Face directory) is rotated by ``rotaq optimize DIR --recipe rotate`` in a fresh Python
process, which writes its own ``getrusage(RUSAGE_SELF).ru_maxrss`` to a file. The baseline is the
same kind of process with the same imports (torch, onnxruntime, transformers, onnx_ir, rotaq)
and no rotation. Asserted: peak(rotate) - peak(baseline) <= 3 x the model's float32 size (the
issue's target; 3.84x before the float64 folds were read and written a block of rows at a time
and verification ran block by block with weights mapped from disk, 11.7x before the streaming
route). Both absolute figures are in the assertion message and printed (pytest -s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rotaq import synthetic as S

# hidden 512, 8 layers, SmolLM2's vocabulary: 50.4M parameters, 201.5 MB in float32
MODEL = S.SyntheticLlama(hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4,
                         dtype="float32", seed=3)
FACTOR = 3.0

_CHILD = r"""
import json, os, resource, sys
import torch, onnxruntime, transformers, onnx_ir  # noqa: F401  (the baseline's imports)
import rotaq, rotaq.cli  # noqa: F401
rc = 0
if sys.argv[2] == "rotate":
    rc = rotaq.cli.main(["optimize", sys.argv[3], "--recipe", "rotate", "-o", sys.argv[4]])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
with open(sys.argv[1], "w") as fh:
    json.dump({"peak": peak, "rc": rc}, fh)
"""


def _peak(tmp: Path, *args: str) -> dict:
    out = tmp / f"peak-{args[0]}.json"
    env = dict(os.environ, ROTAQ_CACHE=str(tmp / "cache"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(out), *args], env=env,
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_rotate_peak_rss_bounded_by_model_size(tmp_path):
    size = MODEL.nbytes("float32")
    assert 190e6 < size < 210e6
    src = S.write_llama(tmp_path / "model", MODEL)
    base = _peak(tmp_path, "baseline")
    rot = _peak(tmp_path, "rotate", str(src), str(tmp_path / "rotated.onnx"))
    assert rot["rc"] == 0
    assert (tmp_path / "rotated.onnx").is_file()
    extra = rot["peak"] - base["peak"]
    msg = (f"model {size / 1e6:.0f} MB fp32; peak RSS: baseline (imports) "
           f"{base['peak'] / 1e6:.0f} MB, rotate {rot['peak'] / 1e6:.0f} MB, rotate - baseline "
           f"{extra / 1e6:.0f} MB = {extra / size:.2f}x the model (limit {FACTOR:.1f}x)")
    print(msg)
    assert extra <= FACTOR * size, msg


def test_float64_reads_and_spill_writes_are_chunked_and_exact(tmp_path, monkeypatch):
    """The float64 copy of a weight on disk (transposed or not) and a spilled float64 array
    written as float32 equal the one-step conversions, with chunks smaller than the tensor."""
    import numpy as np
    import onnx_ir as oir

    from rotaq.rewriter import onnx_store

    monkeypatch.setattr(onnx_store, "CHUNK_BYTES", 4096)  # many chunks, a ragged last one
    rng = np.random.default_rng(0)
    w = rng.standard_normal((301, 77)).astype(np.float32)
    (tmp_path / "w.bin").write_bytes(b"\0" * 12 + w.tobytes())
    t = onnx_store.file_tensor(onnx_store.DataFile(str(tmp_path / "w.bin")), 12,
                               oir.DataType.FLOAT, w.shape, "w")
    for tr in (False, True):
        got = onnx_store.as_float64(t, transpose=tr)
        assert got.flags.c_contiguous and got.dtype == np.float64
        np.testing.assert_array_equal(got, (w.T if tr else w).astype(np.float64))
    monkeypatch.setattr(onnx_store, "SPILL_BYTES", 1024)
    store = onnx_store.SpillStore()
    big = rng.standard_normal((77, 301))
    spilled = store.tensor(big.T, oir.DataType.FLOAT, "s")  # a transposed view, as set_linear
    assert onnx_store.is_on_disk(spilled)
    np.testing.assert_array_equal(spilled.numpy(), big.T.astype(np.float32))
    store.close()
