"""A PyTorch module in, a rotated ONNX file out, run in plain ONNX Runtime.

``rotaq.load(module, example_inputs)`` captures the module with ``torch.export`` (batch and
sequence dims stay dynamic); the rotated model is saved as ONNX and the file is then run with
onnxruntime alone, on a sequence length other than the example's, and compared with the
original module.

    python examples/torch_module_to_onnx.py [HF_MODEL_DIR] [-o OUT.onnx]

Without a directory the module is a tiny random Llama built from a config in memory.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import onnxruntime as ort
import torch
import transformers

import rotaq


def build_module(folder: str | None) -> torch.nn.Module:
    if folder:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return transformers.LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="a Hugging Face causal-LM directory (default: a "
                                             "tiny random Llama)")
    ap.add_argument("-o", "--output", help="output .onnx (default: a temporary folder)")
    args = ap.parse_args()
    out = args.output or os.path.join(tempfile.mkdtemp(prefix="rotaq-example-"), "model.onnx")

    module = build_module(args.model).eval()
    vocab = module.config.vocab_size
    example = {"input_ids": torch.randint(0, vocab, (1, 16))}

    # torch.export capture; kv_cache=False: one input (input_ids), one output (logits). By
    # default a decoder is captured with its KV cache (past_key_values.* in, present.* out):
    # see examples/genai_generate.py and `rotaq generate` for running that form
    model = rotaq.load(module, example, kv_cache=False)
    res = rotaq.optimize(model, "rotate", options={"rotate_qk": True})
    res.save(out)
    print(f"rotated and wrote {out}: max relative error {res.report['max_rel_error']:.3g}")

    ids = torch.randint(0, vocab, (2, 24))  # another batch size and length: dims are dynamic
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        want = module(input_ids=ids).logits.numpy()
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    print(f"ONNX Runtime vs the original module on a [2, 24] input: max relative error {err:.3g}")
    if err > 1e-4:
        raise SystemExit(f"error {err:.3g} exceeds 1e-4")


if __name__ == "__main__":
    main()
