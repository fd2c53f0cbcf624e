"""Verification inputs apart from calibration inputs; user inputs (--inputs / --tokenizer)."""

import json
import math

import numpy as np
import onnx
import pytest
import torch

import rotaq
from rotaq import inputs as inp
from rotaq.cli import main
from rotaq.errors import LoadError
from rotaq.model import max_rel_error, rel_rms_error
from tests.tiny import build

AGGRESSIVE = [{"pass": "lowrank", "method": "whiten", "rank_by": "ratio", "ratio": 0.8}]


def _strip_metadata(path: str) -> None:
    proto = onnx.load(path)
    del proto.metadata_props[:]
    onnx.save(proto, path)


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    """A tiny Llama as ONNX with no rotaq metadata: no tokenizer is known."""
    m, example = build("llama")
    path = str(tmp_path_factory.mktemp("llama") / "llama.onnx")
    rotaq.load(m, example, ir="onnx").save(path)
    _strip_metadata(path)
    return path


@pytest.fixture(scope="module")
def llama_onnx_prefill(tmp_path_factory):
    """The same without a KV cache (logits only): one output to compare on any input draw."""
    m, example = build("llama")
    path = str(tmp_path_factory.mktemp("llama") / "llama_prefill.onnx")
    rotaq.load(m, example, ir="onnx", kv_cache=False).save(path)
    _strip_metadata(path)
    return path


@pytest.fixture(scope="module")
def whisper_encoder(tmp_path_factory):
    """Whisper's audio encoder (tiny config) as ONNX: one input, input_features [1, 16, 32]."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1,
                          encoder_attention_heads=4, decoder_attention_heads=4,
                          encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                          max_source_positions=16, max_target_positions=16, vocab_size=100,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          decoder_start_token_id=1)
    enc = T.WhisperForConditionalGeneration(cfg).model.encoder.eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, input_features):
            return self.enc(input_features).last_hidden_state

    path = str(tmp_path_factory.mktemp("whisper") / "encoder.onnx")
    torch.onnx.export(Encoder().eval(), (torch.randn(1, 16, 32),), path,
                      input_names=["input_features"], dynamo=True)
    return path


def test_lowrank_without_tokenizer_reports_held_out_error(llama_onnx_prefill):
    """Calibration (seed 1) and verification (seed 0) are different synthetic draws; the reported
    error matches an independent check on a third draw."""
    model = rotaq.load(llama_onnx_prefill)
    res = rotaq.optimize(model, rotaq.Recipe("lr", AGGRESSIVE, None))
    rep = res.report
    assert rep["verify_inputs"] == {"source": "synthetic", "seed": inp.VERIFY_SEED,
                                    "shapes": {"input_ids": [8, 32]}, "samples": 8}
    assert rep["calibration_inputs"] == [{"source": "synthetic", "seed": inp.CALIB_SEED,
                                          "shapes": {"input_ids": [8, 256]}, "samples": 8}]
    calib = inp.synthetic_calibration(model.graph, 2048, 256)
    assert inp.overlap(calib, model.sample_inputs) == 0
    fresh = inp.synthetic(model.graph, seed=2, rows=8, seq_len=32)
    ref, out = model.run(fresh), res.model.run(fresh)
    independent, independent_rms = max_rel_error(ref, out), rel_rms_error(ref, out)
    assert independent > 0.1  # an aggressive rank: a real error, not an in-sample fit
    assert abs(rep["max_rel_error"] / independent - 1) < 0.10
    assert abs(rep["rel_rms_error"] / independent_rms - 1) < 0.10
    # what the old verification did (calibrate on the 32 verification tokens, verify on them)
    # hides the error; rotaq now flags any shared row in the report
    one = {"input_ids": model.sample_inputs["input_ids"][:1]}
    same = rotaq.optimize(llama_onnx_prefill, "lowrank", inputs=one, verify_inputs=one)
    fresh_err = max_rel_error(ref, same.model.run(fresh))
    same = same.report
    assert same["max_rel_error"] < 0.1 * fresh_err, (same["max_rel_error"], fresh_err)
    assert same["verify_inputs"]["rows_also_in_calibration"] == 1
    assert same["calibration_inputs"][0]["rows_also_in_verify"] == 1


def test_user_inputs_split_for_a_positional_module():
    """A positional torch MLP with user arrays: the last ceil(N/4) rows verify, the rest
    calibrate, and the reported error is the error on those rows."""
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x)))

    torch.manual_seed(0)
    mlp = MLP().eval()
    x = np.random.default_rng(7).standard_normal((40, 64)).astype(np.float32)
    res = rotaq.optimize(mlp, rotaq.Recipe("lr", AGGRESSIVE, None),
                         example_inputs=(torch.from_numpy(x[:2]),), inputs={"x": x})
    rep, k = res.report, math.ceil(40 / 4)
    assert rep["verify_inputs"]["rows"] == f"{40 - k}..39 of 40"
    assert rep["verify_inputs"]["shapes"] == {"x": [k, 64]}
    assert rep["calibration_inputs"][0]["shapes"] == {"x": [40 - k, 64]}
    assert rep["passes"][0]["stats"]["calibration_samples"] == 40 - k
    held = {"x": x[40 - k:]}
    want = max_rel_error([mlp(torch.from_numpy(held["x"])).detach().numpy()],
                         res.model.run(held))
    assert rep["max_rel_error"] == pytest.approx(want, rel=1e-5)
    # the user's arrays alone are enough to capture the module
    again = rotaq.optimize(mlp, rotaq.Recipe("lr", AGGRESSIVE, None), inputs={"x": x})
    assert again.report["max_rel_error"] == pytest.approx(want, rel=1e-5)


def test_split_rules():
    f = {"a": np.arange(10)[:, None]}
    calib, verify = inp.split(f)
    assert calib["a"][:, 0].tolist() == list(range(7)) and verify["a"][:, 0].tolist() == [7, 8, 9]
    calib, verify = inp.split({"a": np.arange(1)[:, None]})
    assert calib is None and verify["a"].shape == (1, 1)


def _cli(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_audio_encoder_gptq_with_user_features(whisper_encoder, tmp_path, capsys):
    """Whisper's encoder (no input_ids) through w4a16-rotated (GPTQ): calibrates on the first
    6 of 8 feature samples, reports the error on the last 2."""
    import onnxruntime as ort

    feats = np.random.default_rng(3).standard_normal((8, 16, 32)).astype(np.float32)
    npz = tmp_path / "feats.npz"
    np.savez(npz, input_features=feats)
    out = tmp_path / "enc-w4.onnx"
    rc, stdout, err = _cli(["optimize", whisper_encoder, "--recipe",
                            "w4a16-rotated", "-o", str(out), "--inputs", str(npz), "--json"],
                           capsys)
    assert rc == 0, err
    rep = json.loads(stdout)
    q = rep["passes"][1]["stats"]
    assert q["method"] == "gptq" and q["linears"] == 12
    assert q["calibration_samples"] == 6 and q["calibration_tokens"] == 6 * 16
    assert rep["verify_inputs"]["rows"] == "6..7 of 8"
    assert rep["calibration_inputs"][0]["rows"] == "0..5 of 8"

    def run(path, x):
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {"input_features": x[i:i + 1]})[0]
                               for i in range(len(x))])

    held = feats[6:]
    want = max_rel_error([run(whisper_encoder, held)], [run(str(out), held)])
    assert rep["verify"]["written"]["runtime"] == "ort"
    assert rep["verify"]["written"]["max_rel_error"] == pytest.approx(want, rel=1e-4)
    assert 1e-4 < want < 0.2
    # the same model from two files (calibration rows 0..5, verification rows 6..7)
    np.savez(tmp_path / "c.npz", input_features=feats[:6])
    np.savez(tmp_path / "v.npz", input_features=held)
    rc, stdout, err = _cli(["optimize", whisper_encoder, "--recipe", "w4a16-rotated", "-o",
                            str(tmp_path / "b.onnx"), "--inputs", str(tmp_path / "c.npz"),
                            "--verify-inputs", str(tmp_path / "v.npz"), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["verify"]["written"]["max_rel_error"] == pytest.approx(
        rep["verify"]["written"]["max_rel_error"], rel=1e-6)


def test_audio_encoder_statistics_without_user_inputs(whisper_encoder, capsys):
    """inspect --stats on a model without input_ids: synthetic calibration features."""
    rc, stdout, err = _cli(["inspect", whisper_encoder, "--stats", "--json"], capsys)
    assert rc == 0, err
    assert len(json.loads(stdout)["stats"]) == 12


@pytest.mark.parametrize("arrays,needle", [
    ({"input_feature": np.zeros((4, 16, 32), np.float32)},
     "no array for input 'input_features' (expected [N, 16, 32] float32"),
    ({"input_features": np.zeros((4, 16), np.float32)},
     "input 'input_features' has shape [4, 16] (rank 2); expected [N, 16, 32] float32"),
    ({"input_features": np.zeros((4, 16, 31), np.float32)}, "(axis 2 must be 32)"),
    ({"input_features": np.zeros((4, 16, 32), np.int64)},
     "input 'input_features' has dtype int64; expected [N, 16, 32] float32"),
    ({"input_features": np.zeros((4, 16, 32), np.float32), "mask": np.ones((4, 32))},
     "'mask' is not an input of the model"),
])
def test_bad_inputs_exit_2(whisper_encoder, tmp_path, capsys, arrays, needle):
    npz = tmp_path / "bad.npz"
    np.savez(npz, **arrays)
    rc, _, err = _cli(["optimize", whisper_encoder, "-o", str(tmp_path / "o.onnx"),
                       "--inputs", str(npz)], capsys)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_not_npz_and_bad_tokenizer_exit_2(whisper_encoder, llama_onnx, tmp_path, capsys):
    for argv, needle in [
        (["--inputs", whisper_encoder], "not an .npz archive"),
        (["--inputs", str(tmp_path / "none.npz")], "no such file"),
        (["--tokenizer", str(tmp_path)], "has no input_ids input"),
    ]:
        rc, _, err = _cli(["optimize", whisper_encoder, "-o", str(tmp_path / "o.onnx"), *argv],
                          capsys)
        assert rc == 2 and needle in err, err
    from rotaq import assets

    tok = str(assets.builtin_model_dir("minilm-l6"))  # 30522 ids; the tiny llama has 256
    rc, _, err = _cli(["inspect", llama_onnx, "--tokenizer", tok], capsys)
    assert rc == 2 and "outside the model's embedding (256 rows)" in err
    with pytest.raises(LoadError, match="not a directory"):
        rotaq.load(llama_onnx, tokenizer=str(tmp_path / "nope"))


def test_tokenizer_gives_text_inputs_disjoint_from_calibration(tmp_path):
    """A tiny BERT with MiniLM's vocabulary, as ONNX without metadata, plus --tokenizer:
    verification on Wikipedia text, calibration on Lee text; calibrating on Wikipedia skips the
    verification window."""
    from rotaq import assets

    tok = str(assets.builtin_model_dir("minilm-l6"))
    import transformers as T

    torch.manual_seed(0)
    m = T.BertModel(T.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, vocab_size=30522)).eval()
    ids = torch.randint(0, 30522, (1, 8))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    path = str(tmp_path / "bert.onnx")
    rotaq.load(m, example, ir="onnx").save(path)
    _strip_metadata(path)
    model = rotaq.load(path, tokenizer=tok)
    assert model.source["kind"] == "encoder"
    v = model.inputs_info["verify"]
    assert (v["source"], v["text"], v["tokens"]) == ("text", "wiki", 30)
    assert set(model.sample_inputs) == {"input_ids", "attention_mask"}
    res = rotaq.optimize(model, rotaq.Recipe("lr", AGGRESSIVE, None))
    c = res.report["calibration_inputs"][0]
    assert (c["source"], c["text"]) == ("text", "lee")
    from rotaq.eval.stats import calibration_feeds

    feeds = calibration_feeds(model, "wiki", 256, 64)
    assert model.inputs_info["calibration_used"][-1]["skipped_tokens"] == 64
    body = model.sample_inputs["input_ids"][0, 1:-1]  # the verification text without CLS/SEP
    assert not np.array_equal(feeds["input_ids"][0, :30], body)
    ids = np.asarray(assets.token_windows(assets_tok(tok), "wiki", 64 + 256, 64))
    assert np.array_equal(ids[0, :30], body) and np.array_equal(feeds["input_ids"], ids[1:])


def assets_tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_model_that_rejects_synthetic_inputs(tmp_path, capsys):
    """A graph whose Reshape needs a length that is a multiple of 24: the synthetic sample
    (length 32) cannot run; rotaq says so (exit 2) and the user's inputs make it work."""
    from onnx import TensorProto, helper, numpy_helper

    w1, w2 = np.random.default_rng(0).standard_normal((2, 24, 24)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("MatMul", ["r", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
         helper.make_node("MatMul", ["a", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "len"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.array([-1, 24]), "shape")])
    path = str(tmp_path / "reshape.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    argv = ["optimize", path, "--recipe", "lowrank", "--set", "method=svd", "--set", "rank=8",
            "-o", str(tmp_path / "o.onnx"), "--json"]
    rc, _, err = _cli(argv, capsys)
    assert rc == 2 and "fails on synthetic sample inputs" in err and "--inputs" in err
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(1).standard_normal((8, 48))
             .astype(np.float32))
    rc, out, err = _cli(argv + ["--inputs", str(tmp_path / "x.npz")], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["verify_inputs"]["shapes"] == {"x": [2, 48]} and rep["max_rel_error"] > 1e-3
