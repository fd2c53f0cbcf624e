"""Quantization on the real SmolLM2 ONNX graph: accuracy on Wikipedia text and the ORT kernels.

Small budgets (1024 tokens) keep CI fast; the benchmark (benchmarks/quant_bench.py) measures the
full 8192-token figures.
"""

import pytest

import rotaq
from rotaq.backends.ort import ort_kernel_report
from rotaq.eval.quality import perplexity

pytestmark = pytest.mark.real
TOKENS, WINDOW = 1024, 512


@pytest.fixture(scope="module")
def fp32_ppl(smollm2_onnx):
    return perplexity(smollm2_onnx, "wiki", TOKENS, WINDOW, progress=False)["ppl"]


def test_w4a16_matmulnbits(smollm2_onnx, fp32_ppl, tmp_path):
    res = rotaq.optimize(smollm2_onnx, "w4a16")
    ppl = perplexity(res.model, "wiki", TOKENS, WINDOW, progress=False)["ppl"]
    assert fp32_ppl < ppl < 1.45 * fp32_ppl  # RTN g128 asym: x1.32 measured (1024 tokens)
    out = tmp_path / "w4.onnx"
    res.save(str(out))
    ops = ort_kernel_report(str(out))
    assert ops.get("com.microsoft.MatMulNBits", 0) == 210
    assert out.stat().st_size + (tmp_path / "w4.onnx.data").stat().st_size < 0.45 * 542e6


def test_w8a8_rotated(smollm2_onnx, fp32_ppl, tmp_path):
    """Default lowering: int8 groups of 64 in MatMulNBits (activations per row and block)."""
    res = rotaq.optimize(smollm2_onnx, "w8a8-rotated")
    ppl = perplexity(res.model, "wiki", TOKENS, WINDOW, progress=False)["ppl"]
    assert ppl < 1.02 * fp32_ppl
    out = tmp_path / "w8.onnx"
    res.save(str(out))
    assert ort_kernel_report(str(out)).get("com.microsoft.MatMulNBits", 0) == 210


def test_w8a8_per_channel_int8_kernels(smollm2_onnx, fp32_ppl, tmp_path):
    """Per-channel QDQ: ORT's integer kernels (one dynamic activation scale per tensor)."""
    res = rotaq.optimize(smollm2_onnx, "w8a8-rotated", options={"w_group": -1})
    ppl = perplexity(res.model, "wiki", TOKENS, WINDOW, progress=False)["ppl"]
    assert ppl < 1.25 * fp32_ppl
    out = tmp_path / "w8c.onnx"
    res.save(str(out))
    ops = ort_kernel_report(str(out))
    int8 = sum(v for k, v in ops.items() if k.split(".")[-1] in (
        "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul"))
    assert int8 == 210
