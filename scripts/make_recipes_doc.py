"""Writes docs/recipes.md: every shipped recipe's hyperparameters beside their reference values and sources.

    python scripts/make_recipes_doc.py            # (re)write docs/recipes.md
    python scripts/make_recipes_doc.py --check    # exit 1 if docs/recipes.md is not what this would write

The tables come from the configs in configs/ and the reference rows in nfjax/recipe_sources.py (nfjax.
recipe_sources.render). Writing fails, and nothing is written, when a config value differs from the reference
value its row records: fix the config, or the row (with its source), first.
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    from nfjax.recipe_sources import ROOT, render
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nfjax.recipe_sources import ROOT, render

DOC = os.path.join(ROOT, "docs", "recipes.md")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with docs/recipes.md instead of writing it")
    parser.add_argument("--out", default=DOC, help="the file to write or check (default: docs/recipes.md)")
    args = parser.parse_args()
    try:
        text = render()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check:
        current = open(args.out).read() if os.path.exists(args.out) else None
        if current != text:
            state = "missing" if current is None else "stale"
            print(f"{args.out} is {state}; regenerate it with: python scripts/make_recipes_doc.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
