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
