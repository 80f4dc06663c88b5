"""Copy the tables the experiment scripts wrote (experiments/results/*.md) into README.md.

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` markers, where
NAME is the results file's stem; nothing else in the README is touched.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for table in sorted((ROOT / "experiments" / "results").glob("*.md")):
        pattern = re.compile(rf"(<!-- results:{table.stem} -->\n).*?(<!-- /results:{table.stem} -->)", re.S)
        text, count = pattern.subn(lambda m: m.group(1) + table.read_text() + m.group(2), text)
        print(f"{table.name}: {'updated' if count else 'no markers in README'}")
    readme.write_text(text)


if __name__ == "__main__":
    main()
