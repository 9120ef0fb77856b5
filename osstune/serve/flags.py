"""Command-line flags for the engine's options, derived from `EngineConfig` (one flag per field, the
dataclass the single source of truth), shared by `osstune serve` and `osstune generate`. No torch."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from osstune.serve.config import EngineConfig


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """`--block-size`, `--max-num-seqs`, ...: one flag per EngineConfig field, unset by default."""
    group = p.add_argument_group("engine options (osstune.serve.config.EngineConfig)")
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f"{f.metadata['help']} (default: {f.default})" if f.default is not None else f.metadata["help"]
        if kind is bool:
            group.add_argument(flag, type=_boolean, metavar="true|false", default=None, help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        group.add_argument(flag, type=base, default=None, help=help_text)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the flags give (fields not given keep their defaults); checked by the dataclass."""
    return EngineConfig(**{name: getattr(args, name) for name in EngineConfig.field_names() if getattr(args, name) is not None})
