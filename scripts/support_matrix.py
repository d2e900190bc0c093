#!/usr/bin/env python3
"""Render the support matrix (guest kernel x capability) from what the test suite ran.

The suite records every guest test's outcome by kernel and capability (tests/support.py) in
``$MEMVIRT_TEST_LOGS/support.json``. This prints the table, or with ``--write`` puts it into
docs/support.md between its ``support-matrix`` markers, so the page says what the tests ran and
not what someone remembered. A cell is ``✓ N`` (N tests passed there, none failed), ``✗ F/N``
(F of N failed) or empty (nothing ran).

    .venv/bin/python scripts/support_matrix.py [/tmp/memvirt-test-logs/support.json] [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ORDER = [
    "boot & exec",
    "introspection",
    "reclaim & KSM",
    "dirty tracking",
    "live migration",
    "compression",
    "cloning",
    "pm migration",
    "daemon",
    "libvirt",
    "demo",
]
BEGIN = "<!-- support-matrix:begin (scripts/support_matrix.py --write) -->"
END = "<!-- support-matrix:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "support.md"


def _version_key(release: str) -> tuple[object, ...]:
    parts: list[object] = []
    for tok in release.replace("-", ".").replace("+", ".").split("."):
        parts.append((0, int(tok), "") if tok.isdigit() else (1, 0, tok))
    return tuple(parts)


def table(data: dict) -> str:
    """The markdown table of a support file's contents."""
    cells: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    dates: dict[tuple[str, str], str] = {}
    for row in data.get("tests", {}).values():
        failed = row.get("outcome") == "failed"
        for release, arch in row.get("kernels", []):
            key = (str(release), str(arch))
            dates[key] = max(dates.get(key, ""), str(row.get("when", "")))
            for cap in row.get("capabilities", []):
                cell = cells[key][str(cap)]
                cell[0] += 1
                cell[1] += failed
    caps = [c for c in ORDER if any(c in v for v in cells.values())]
    caps += sorted({c for v in cells.values() for c in v} - set(ORDER))
    lines = [
        "| kernel | arch | " + " | ".join(caps) + " | last run |",
        "| --- | --- | " + " | ".join("---" for _ in caps) + " | --- |",
    ]
    for key in sorted(cells, key=lambda k: (k[1], _version_key(k[0]))):
        row = []
        for c in caps:
            n, f = cells[key].get(c, [0, 0])
            row.append("" if not n else f"✗ {f}/{n}" if f else f"✓ {n}")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(row) + f" | {dates[key]} |")
    return "\n".join(lines)


def write(doc: Path, text: str) -> None:
    page = doc.read_text()
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"support_matrix: {doc} lacks the markers {BEGIN!r} ... {END!r}")
    doc.write_text(page[: start + len(BEGIN)] + "\n\n" + text + "\n\n" + page[end:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", default="/tmp/memvirt-test-logs/support.json", type=Path)
    ap.add_argument("--write", action="store_true", help=f"put the table into {DOC}")
    args = ap.parse_args(argv)
    try:
        data = json.loads(args.file.read_text())
    except (OSError, ValueError) as e:
        print(f"support_matrix: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    text = table(data)
    if args.write:
        write(DOC, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
