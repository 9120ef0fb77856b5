"""The `osstune` command line. Each feature module registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from osstune.errors import Interrupted, OsstuneError

# (module, registration function): each adds its subcommands to the top-level parser. Imports are
# lazy in the sense that heavy libraries are imported inside the command functions, not here.
_COMMANDS = (
    ("osstune.demo", "add_command"),
    ("osstune.create", "add_command"),
    ("osstune.data.cli", "add_commands"),
    ("osstune.train.cli", "add_commands"),
    ("osstune.infer.cli", "add_commands"),
    ("osstune.infer.batch", "add_command"),
    ("osstune.serve.cli", "add_command"),
    ("osstune.export_cli", "add_command"),
    ("osstune.plan.cli", "add_command"),
)


# The CUDA caching allocator with expandable segments: the same tensors take less reserved GPU memory
# (QLoRA on gpt-oss-20b at 2,048 tokens: 14.58 -> 14.23 GiB reserved, docs/PERFORMANCE.md); CUDA
# graphs record with it. PyTorch reads the setting when CUDA starts, so `main` sets it before any
# command imports torch; a value the user set wins.
CUDA_ALLOC_CONF = "expandable_segments:True"


def build_parser() -> argparse.ArgumentParser:
    from osstune import __version__

    parser = argparse.ArgumentParser(prog="osstune", description="Fine-tune, test and serve gpt-oss models.")
    parser.add_argument("--version", action="version", version=f"osstune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, register in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if not (e.name and module_name.startswith(e.name)):
                raise
            continue  # feature not built yet
        getattr(module, register)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`osstune data render ... | head -1`): not an error. Point stdout at
        # /dev/null so the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("osstune: interrupted", file=sys.stderr)
        return 130
    except Interrupted as e:
        print(f"osstune: {e}", file=sys.stderr)
        return e.exit_code
    except (OsstuneError, ValueError, OSError) as e:
        # User errors (bad files, bad options, a run that stopped for a stated reason) carry a
        # message that says what and where; a traceback would bury it.
        print(f"osstune: error: {_message(e)}", file=sys.stderr)
        return 1


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror and not isinstance(e, FileNotFoundError):
        # FileExistsError, IsADirectoryError, PermissionError, ...: "<file>: <what>"
        return f"{e.filename}: {e.strerror.lower()}"
    return str(e)

if __name__ == "__main__":
    sys.exit(main())
