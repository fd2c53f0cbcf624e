"""``rotaq compile --tune N`` / ``--tune-db``: option checks (fast) and, marked slow (TVM's
tensor-intrinsic registry alone takes ~30 s to import on 2 shared cores), a tiny model tuned
with a few trials: database written, applied, outputs equal to the untuned build's, reused."""

import json
import os

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the TVM extra is not installed (pip install rotaq[tvm])")
import rotaq
from rotaq.backends import tvm as tb
from rotaq.backends import tvm_tune as TT
from rotaq.cli import main
from rotaq.errors import RotaqError
from tests.tiny import loaded


@pytest.mark.parametrize("argv, message", [
    (["--tune", "-1"], "--tune expects a number of trials >= 0"),
    (["--tune", "many"], "--tune expects a number of trials, got 'many'"),
    (["--tune", "4", "--backend", "ort"], "need --backend tvm with an llvm target"),
    (["--tune", "4", "--target", "cuda"], "need --backend tvm with an llvm target"),
    (["--tune-db", "/nonexistent/db"], "no MetaSchedule database there"),
])
def test_cli_bad_tune_values(tmp_path, capsys, argv, message):
    """Bad values exit 2 with one line, before any model is loaded (the model path does not
    even exist) and without writing the output."""
    out = tmp_path / "art"
    code = main(["compile", str(tmp_path / "missing.onnx"), "-o", str(out), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not out.exists()


def test_db_dir(tmp_path):
    """A database is found in the folder itself or in its tuning/ subfolder."""
    db = tmp_path / "art" / "tuning"
    db.mkdir(parents=True)
    with pytest.raises(RotaqError, match="no MetaSchedule database"):
        TT.db_dir(str(tmp_path / "art"))
    for f in TT.DB_FILES:
        (db / f).write_text("")
    assert TT.db_dir(str(tmp_path / "art")) == str(db) == TT.db_dir(str(db))


def test_hand_scheduled_kernels_are_not_tasks():
    """rotaq's scheduled matmul is recognized as scheduled, its unscheduled form is not."""
    from rotaq.backends import tvm_kernels as K

    func = K.qmatmul_func(1, 64, 128, 4, 32, nt=64)
    assert not TT.hand_scheduled(func)
    assert TT.hand_scheduled(K.schedule_qmatmul_cpu(func, 1, 128, 64))


@pytest.mark.slow
def test_tune_tiny_model(tmp_path, capsys):
    """8 trials on a tiny llama: a database with records, applied (as many PrimFuncs replaced
    as tasks with records, or more: a task stands for equal functions of several buckets), logits equal to the untuned artefact's within the README's 1e-4; a second
    compile with --tune-db reuses it without tuning."""
    path = str(tmp_path / "llama.onnx")
    model = rotaq.optimize(loaded("llama", "onnx", kv_cache=True), "w4a16-rotated", verify=False)
    model.model.save(path, tokenizer=False)
    base = tb.compile_tvm(path, str(tmp_path / "a0"), tokens=[8], decode=[15], progress=False)
    assert base["tuning"] is None and not (tmp_path / "a0" / "tuning").exists()
    code = main(["compile", path, "--backend", "tvm", "--tokens", "8", "--contexts", "15",
                 "--tune", "8", "-o", str(tmp_path / "a1"), "--json"])
    out = capsys.readouterr()
    meta = json.loads(out.out)
    assert code == 0 and "tuning: done, " in out.err
    tuning = meta["tuning"]
    assert tuning["trials"] == 8 and tuning["tasks"] >= 1 and tuning["records"] >= 1
    assert 1 <= tuning["measured"] <= 8 + 4  # the last round may pass the budget by its size
    assert tuning["tunable"] > tuning["tasks"] and tuning["applied"] >= tuning["records"]
    for f in TT.DB_FILES:
        assert os.path.getsize(tmp_path / "a1" / "tuning" / f) > 0

    ref = rotaq.load(path)
    feeds = ref.token_feeds(np.random.default_rng(0).integers(0, 200, (1, 8)))
    a = tb.load(str(tmp_path / "a0")).graph.run(feeds)[0]
    b = tb.load(str(tmp_path / "a1")).graph.run(feeds)[0]
    assert float(np.abs(a - b).max() / np.abs(a).max()) < 1e-4

    again = tb.compile_tvm(path, str(tmp_path / "a2"), tokens=[8], decode=[15], progress=False,
                           tune_db=str(tmp_path / "a1"))
    assert again["tuning"]["trials"] == 0
    assert again["tuning"]["from"] == str(tmp_path / "a1")
    assert again["tuning"]["applied"] == tuning["applied"]
    c = tb.load(str(tmp_path / "a2")).graph.run(feeds)[0]
    assert float(np.abs(c - a).max() / np.abs(a).max()) < 1e-4
