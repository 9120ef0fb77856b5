"""`osstune export`: the command line of osstune/export.py, kept apart so that `osstune --help`
imports no torch."""

from __future__ import annotations

import argparse

FORMATS = ("bf16", "mxfp4")  # osstune.export.FORMATS


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="merge a LoRA adapter into its base model and write a Hugging Face checkpoint",
        description="Merge a LoRA adapter into its base model and write a Hugging Face checkpoint.",
    )
    p.add_argument("--model", required=True, help="base model: checkpoint directory, Hugging Face repo id or preset")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output", required=True, help="directory to write the merged checkpoint to")
    p.add_argument(
        "--format", choices=FORMATS, default="bf16",
        help="expert layout: bf16 (dense, exact) or mxfp4 (requantized; the error is reported)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from osstune.export import export_merged

    export_merged(args.model, args.adapter, args.output, args.format, overwrite=args.overwrite)
    return 0
