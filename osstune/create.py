"""`osstune create`: write a randomly initialised gpt-oss checkpoint in the real Hugging Face layout.

Tensors are generated one at a time and streamed into the shards (see `checkpoint.random_init` for
the initialisation and its per-tensor seeding), so gpt-oss-20b, MXFP4 or bf16, is written with a
few GB of host memory. The output loads in osstune, transformers and vLLM.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from osstune.config import PRESETS, ModelConfig, preset as get_preset


def create_checkpoint(
    preset: str | ModelConfig,
    output: str | Path,
    mxfp4: bool = False,
    seed: int = 0,
    *,
    max_shard_size: int | str = "5GB",
    tokenizer_source: str | Path | None = None,
    write_tokenizer: bool = True,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> Path:
    """Write a random checkpoint of `preset` (a name or a ModelConfig) to `output`; returns `output`.

    mxfp4: experts as packed MXFP4 blocks + scales (drawn in bf16, then quantized), as gpt-oss ships.
    The same (preset, seed) gives the same weights whatever the shard size, and equals
    `osstune.load_model(preset, seed=seed)` (bf16) or its packed variant.
    """
    from osstune.checkpoint.random_init import RandomSource
    from osstune.checkpoint.save import write_checkpoint

    cfg = preset if isinstance(preset, ModelConfig) else get_preset(preset)
    cfg = cfg.replace(expert_format="mxfp4" if mxfp4 else "bf16")
    return write_checkpoint(
        output,
        cfg,
        RandomSource(cfg, seed, device=device),
        max_shard_size=max_shard_size,
        tokenizer_source=tokenizer_source,
        write_tokenizer=write_tokenizer,
        overwrite=overwrite,
        progress=progress,
    )


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "create",
        help="write a randomly initialised checkpoint (Hugging Face layout)",
        description="Write a randomly initialised gpt-oss checkpoint in the real Hugging Face layout.",
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shape")
    p.add_argument("--output", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--mxfp4", action="store_true", help="pack experts as MXFP4, as gpt-oss ships (default: bf16)")
    p.add_argument("--seed", type=int, default=0, help="weights depend only on the seed and tensor name (default 0)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--tokenizer-from", type=Path, default=None, help="copy tokenizer files from this directory")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    out = create_checkpoint(
        args.preset,
        args.output,
        mxfp4=args.mxfp4,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        tokenizer_source=args.tokenizer_from,
        write_tokenizer=not args.no_tokenizer,
        overwrite=args.overwrite,
        progress=progress,
    )
    layout = "MXFP4" if args.mxfp4 else "bf16"
    print(f"wrote {args.preset} ({layout} experts, seed {args.seed}) to {out} in {time.perf_counter() - start:.1f}s")
    return 0
