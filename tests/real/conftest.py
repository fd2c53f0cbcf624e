"""Trained-model tests: SmolLM2-135M and MiniLM-L6 from their registry packages.

Captures and ONNX exports are cached under ~/.cache/rotaq (or $ROTAQ_CACHE), so a rerun is fast;
a clean cache costs a few minutes (GGUF conversion, torch.export, ONNX export).
"""

import pytest

import rotaq


@pytest.fixture(scope="session")
def smollm2():
    return rotaq.load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_onnx():
    return rotaq.load("smollm2-135m", ir="onnx")


@pytest.fixture(scope="session")
def minilm():
    return rotaq.load("minilm-l6")


@pytest.fixture(scope="session")
def minilm_onnx():
    return rotaq.load("minilm-l6", ir="onnx")


@pytest.fixture
def loaded_by_cli(monkeypatch, request):
    """Hand the CLI the session's captured built-ins instead of loading them again (a SmolLM2
    load reads a 540 MB program, tens of seconds). Only a call identical to the fixture's own
    (the name, that IR, no input options) is served from it; every other load (the written
    file, ...) goes to ``rotaq.load``. Returns the calls served, for the test to check."""
    real = rotaq.load
    fixtures = {("smollm2-135m", "fx"): "smollm2", ("smollm2-135m", "onnx"): "smollm2_onnx",
                ("minilm-l6", "fx"): "minilm", ("minilm-l6", "onnx"): "minilm_onnx"}
    served = []

    def load(src, example_inputs=None, **kw):
        key = (src, kw.get("ir", "fx"))
        plain = example_inputs is None and not any(kw.get(k) for k in (
            "inputs", "verify_inputs", "tokenizer")) and kw.get("seq_len", 32) == 32
        if isinstance(src, str) and key in fixtures and plain:
            served.append(key)
            return request.getfixturevalue(fixtures[key])
        return real(src, example_inputs, **kw)

    monkeypatch.setattr(rotaq, "load", load)
    return served
