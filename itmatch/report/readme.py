"""Splice the rendered results table into README.md between markers.

    python -m itmatch.report.readme results/report/results_table.md README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

START = "<!-- results-table:start -->"
END = "<!-- results-table:end -->"


def splice(table_md: str, readme: str) -> str:
    """``readme`` with the text between the START and END markers replaced by ``table_md``."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise ValueError(f"README must contain the markers {START!r} and then {END!r}, once each")
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table_md.rstrip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    table, readme = Path(argv[0]), Path(argv[1])
    readme.write_text(splice(table.read_text(encoding="utf-8"), readme.read_text(encoding="utf-8")),
                      encoding="utf-8")
    print(f"{readme}: results table updated from {table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
