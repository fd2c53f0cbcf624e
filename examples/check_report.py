"""Check a ``rotaq optimize --json`` report: schema, verification and an error bound.

    python examples/check_report.py report.json --max-error 1e-4

Exit code 0 when the report passes, 4 when the error exceeds the bound or a verification is
missing, 5 when the report has another schema than this script knows.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="the JSON printed by rotaq optimize --json")
    ap.add_argument("--max-error", type=float, default=1e-4,
                    help="largest accepted max relative error (default 1e-4)")
    args = ap.parse_args()
    with open(args.report) as f:
        rep = json.load(f)
    if rep.get("schema") != 1:
        print(f"unknown report schema {rep.get('schema')!r} (rotaq {rep.get('rotaq_version')})")
        return 5
    verify = rep["verify"]  # always {"rewrite": ..., "written": ..., "passed": ...}
    for step in ("rewrite", "written"):
        if verify[step] is None:
            print(f"{step} was not verified")
            return 4
        print(f"{step}: max relative error {verify[step]['max_rel_error']:.3g} "
              f"({verify[step]['runtime']})")
    err = rep["max_rel_error"]
    if err > args.max_error:
        print(f"FAIL: max relative error {err:.3g} > {args.max_error:g}")
        return 4
    files = ", ".join(f"{f['path']} ({f['bytes']} bytes)" for f in rep["files"])
    print(f"OK: max relative error {err:.3g} <= {args.max_error:g}; files: {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
