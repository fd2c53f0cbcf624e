"""Which Hadamard orders up to a limit rotaq constructs (Sylvester, Paley I/II over GF(p^k),
Kronecker products); writes benchmarks/results/hadamard_sizes.md."""

import argparse
import os

from rotaq.linalg.hadamard import covered_sizes, hadamard_factors, uncovered_sizes


def _ranges(xs: list[int]) -> str:
    return ", ".join(str(x) for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=16384)
    ap.add_argument("-o", "--output", default=os.path.join(os.path.dirname(__file__), "results",
                                                           "hadamard_sizes.md"))
    args = ap.parse_args()
    cov = [n for n in covered_sizes(args.limit) if n % 4 == 0]
    unc = uncovered_sizes(args.limit)
    named = [576, 1536, 2048, 2304, 3072, 4096, 4864, 5120, 8192, 11008, 14336, 18944]
    lines = [
        f"# Hadamard orders up to {args.limit}",
        "",
        f"Multiples of 4 up to {args.limit}: {len(cov) + len(unc)}; constructed: **{len(cov)}**;"
        f" not constructed: {len(unc)} (rotaq falls back to a random orthogonal matrix with a"
        " warning for offline rotations, and skips online ones).",
        "",
        "| model dimension | factors |",
        "|---|---|",
    ]
    for n in named:
        try:
            f = " x ".join(str(x.shape[0]) for x in hadamard_factors(n))
        except ValueError:
            f = "not constructed"
        lines.append(f"| {n} | {f} |")
    lines += ["", f"## Not constructed (multiples of 4 up to {args.limit})", "", _ranges(unc), "",
              f"## Constructed (multiples of 4 up to {args.limit})", "", _ranges(cov), ""]
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"{len(cov)} constructed, {len(unc)} not; wrote {args.output}")


if __name__ == "__main__":
    main()
