"""Copy the benchmark result tables (benchmarks/results/*.md) into README.md between markers
`<!-- results:NAME -->` and `<!-- /results:NAME -->`."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    path = os.path.join(ROOT, "README.md")
    text = open(path, encoding="utf-8").read()
    for name in re.findall(r"<!-- results:([\w-]+) -->", text):
        md = os.path.join(ROOT, "benchmarks", "results", f"{name}.md")
        if not os.path.exists(md):
            continue
        body = open(md, encoding="utf-8").read().strip()
        text = re.sub(rf"(<!-- results:{name} -->).*?(<!-- /results:{name} -->)",
                      lambda m: f"{m.group(1)}\n{body}\n{m.group(2)}", text, flags=re.S)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
