"""Generate from a generation folder with onnxruntime-genai alone (no rotaq import):
    python examples/genai_generate.py DIR [PROMPT] [MAX_NEW_TOKENS]
DIR comes from `rotaq optimize MODEL --recipe R -o DIR/`; greedy decoding."""
import sys

import onnxruntime_genai as og

folder, prompt = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "The capital of France is"
model = og.Model(folder)
tokenizer = og.Tokenizer(model)
ids = tokenizer.encode(prompt)
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(ids) + int(sys.argv[3] if len(sys.argv) > 3 else 32))
generator = og.Generator(model, params)
generator.append_tokens(ids)
new = []
while not generator.is_done():
    generator.generate_next_token()
    new.append(int(generator.get_next_tokens()[0]))
print(prompt + tokenizer.decode(new))
print("tokens:", " ".join(map(str, new)), file=sys.stderr)
