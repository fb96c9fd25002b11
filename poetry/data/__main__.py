"""`python -m poetry.data stats DIR`: counts and coverage of a training tree (or JSON/JSONL file)."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from . import DataError, load_poems
from .stats import compute_stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poetry.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="counts and coverage of training poems")
    stats.add_argument("path", help="a train-data directory, a JSON list or a JSONL file")
    stats.add_argument("--on-invalid", choices=["error", "skip"], default="error")
    stats.add_argument("--max-items", type=int, default=3, help="words/sentences per built question")
    args = parser.parse_args(argv)

    console = Console()
    try:
        loaded = load_poems(args.path, on_invalid=args.on_invalid)
    except DataError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    table = Table(title=f"poetry.data stats: {args.path}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in compute_stats(loaded.records, args.max_items).rows():
        table.add_row(name, value)
    console.print(table)
    console.print(loaded.summary("poems"), highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
