"""`osstune data check` and `osstune data render`.

The top-level parser (osstune/cli.py) calls `add_commands(subparsers)`; each command's `func(args)`
returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from osstune.data.conversation import parse_row
from osstune.data.errors import DataError, RowError
from osstune.data.masks import TRAIN_ON, train_mask, untrained_mask
from osstune.data.pipeline import OVERFLOW, DataOptions, TokenizedRows
from osstune.data.render import RenderOptions, harmony_encoding, render_for_training
from osstune.data.sources import parse_columns, read_source

_SPEC_HELP = (
    ".jsonl, .json, .csv or .parquet file(s) (comma-separated, or a glob), a directory saved by datasets, "
    "or hf:org/name[:config][@split]"
)

_GREEN, _RESET = "\x1b[32m", "\x1b[0m"


def add_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="check and inspect chat data files")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    check = sub.add_parser("check", help="validate a data file and summarize its tokens")
    check.add_argument("file", help=_SPEC_HELP)
    check.add_argument("--skip-invalid", action="store_true", help="skip invalid rows (counted) instead of failing")
    check.add_argument("--max-length", type=int, default=None, help="tokens per row (default: no limit)")
    check.add_argument("--overflow", choices=OVERFLOW, default="error", help="rows over --max-length (default: error)")
    check.add_argument("--max-problems", type=int, default=20, help="problems listed before stopping (default: 20)")
    _add_render_arguments(check)
    check.set_defaults(func=run_check)

    render = sub.add_parser("render", help="show rows as harmony text with the trained tokens marked")
    render.add_argument("file", help=_SPEC_HELP)
    render.add_argument("--index", type=int, default=None, help="only row N (0-based, in file order)")
    render.add_argument("--json", action="store_true", help='one JSON object per row: {"line", "text", "tokens", "train_mask"}')
    _add_render_arguments(render)
    render.set_defaults(func=run_render)


def _add_render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-on", choices=TRAIN_ON, default="last",
                        help="assistant messages trained: the last turn (default), its final answers, or all")
    parser.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium",
                        help="system message default when a row does not set it (default: medium)")
    parser.add_argument("--column", dest="columns", action="append", default=[], metavar="KEY=COLUMN",
                        help="read osstune's KEY from the source column COLUMN, e.g. prompt=question (repeatable)")


def _render_options(args) -> RenderOptions:
    return RenderOptions(reasoning_effort=args.reasoning_effort)


def run_check(args) -> int:
    options = DataOptions(
        max_length=args.max_length,
        overflow=args.overflow,
        train_on=args.train_on,
        skip_invalid=args.skip_invalid,
        max_problems=args.max_problems,
        render=_render_options(args),
        columns=tuple(args.columns),
    )
    reader = TokenizedRows(args.file, options)
    lengths = []
    try:
        for row in reader:
            lengths.append(len(row.ids))
    except DataError as e:
        print(e.with_hint(skip="--skip-invalid", length="raise --max-length, or pass --overflow truncate or drop"), file=sys.stderr)
        return 1
    print(reader.summary.describe())
    if not lengths:
        print(f"osstune: error: {args.file}: no usable rows", file=sys.stderr)
        return 1
    print(length_histogram(np.asarray(lengths)))
    return 0


def length_histogram(lengths: np.ndarray) -> str:
    """Rows per power-of-two length bucket, and the usual quantiles."""
    lines = [
        f"tokens per row: min {lengths.min()}, median {int(np.median(lengths))}, "
        f"p95 {int(np.percentile(lengths, 95))}, max {lengths.max()}"
    ]
    low, upper, width = 0, 64, 40
    while upper < lengths.min():  # start at the first bucket that has rows
        low, upper = upper, upper * 2
    while low < lengths.max():
        n = int(((lengths > low) & (lengths <= upper)).sum())
        bar = "#" * max(1 if n else 0, round(width * n / len(lengths)))
        lines.append(f"  {low + 1:>7}-{upper:<7} {n:>8}  {bar}")
        low, upper = upper, upper * 2
    return "\n".join(lines)


def run_render(args) -> int:
    options = _render_options(args)
    encoding = harmony_encoding()
    color = sys.stdout.isatty() and not args.json
    found = False
    for index, raw in enumerate(read_source(args.file, parse_columns(args.columns))):
        if args.index is not None and index != args.index:
            continue
        found = True
        try:
            if raw.error:
                raise RowError(raw.error)
            conversation = parse_row(raw.value).conversation
        except RowError as e:
            print(f"{raw.location}: {e}", file=sys.stderr)
            return 1
        ids = np.asarray(render_for_training(conversation, options), dtype=np.uint32)
        mask = train_mask(ids, args.train_on, encoding)
        untrained = untrained_mask(ids, conversation, encoding)
        if untrained is not None:
            mask &= ~untrained
        if args.json:
            text = encoding.decode(ids.tolist())
            print(json.dumps({"line": raw.line, "text": text, "tokens": ids.tolist(),
                              "train_mask": mask.astype(int).tolist()}, ensure_ascii=False))
        else:
            print(f"# {raw.location}  ({len(ids)} tokens, {int(mask.sum())} trained"
                  f"{', trained in green' if color else ''})")
            print(_highlight(ids, mask, encoding, color))
            print()
    if args.index is not None and not found:
        print(f"{args.file}: no row {args.index} (rows are numbered from 0)", file=sys.stderr)
        return 1
    return 0


def _highlight(ids: np.ndarray, mask: np.ndarray, encoding, color: bool) -> str:
    if not color:
        return encoding.decode(ids.tolist())
    # Decode runs of equal mask together: runs change at message boundaries, never inside a character.
    change = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    pieces = []
    for run in np.split(np.arange(len(ids)), change):
        text = encoding.decode(ids[run].tolist())
        pieces.append(f"{_GREEN}{text}{_RESET}" if mask[run[0]] else text)
    return "".join(pieces)
