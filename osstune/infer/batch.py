"""`osstune generate`: answer every prompt of a file on the serving engine, results in input order.

Rows are read and rendered first (`batch_rows`): a bad row stops the run before the model is loaded,
naming its file and line (or is skipped, and counted, with --skip-invalid). Rows are then queued on
one `LLMEngine` as others finish, enough to keep every slot of the batch filled, and each result is
written as soon as the rows before it are (`batch_output`), so an interrupted run is resumed by
running the same command again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from osstune.errors import Interrupted
from osstune.infer.progress import Progress
from osstune.interrupt import StopRequest
from osstune.serve.config import EngineConfig
from osstune.serve.flags import add_engine_options, engine_config



def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate answers for every prompt of a file (batched, resumable)",
        description=(
            "Render each chat row of --input in the harmony format, generate all of them on the serving "
            "engine, and write one JSON object per row to --output in input order (final answer and "
            "reasoning separated). Re-running the same command resumes an interrupted output."
        ),
    )
    p.add_argument("--model", required=True, help="checkpoint directory, Hugging Face id or preset name (e.g. tiny)")
    p.add_argument("--adapter", help="LoRA adapter directory, applied to every row")
    p.add_argument("--input", required=True, help=".jsonl or .json file of chat rows (the formats of osstune data)")
    p.add_argument("--output", required=True, help=".jsonl file of results; resumed when it exists")
    p.add_argument("--overwrite", action="store_true", help="replace --output instead of resuming it")
    p.add_argument("--skip-invalid", action="store_true", help="generate the valid rows and report the others")
    p.add_argument(
        "--reasoning-effort", choices=("low", "medium", "high"), default="medium",
        help="for rows without their own reasoning_effort (default: %(default)s)",
    )
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=2048, help="new tokens per row at most (default: %(default)s)")
    # OpenAI recommends temperature 1.0 and top_p 1.0 for gpt-oss (openai/gpt-oss README); 0 is greedy.
    s.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: %(default)s)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    s.add_argument("--seed", type=int, help="row i samples with seed + i: reproducible, and the same when resumed")
    add_engine_options(p)
    e = p.add_argument_group("device")
    e.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    e.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"),
        help="cast the weights (decodes MXFP4 experts); default: as stored",
    )
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace, log: TextIO | None = None) -> int:
    from osstune.data.errors import DataError
    from osstune.data.render import RenderOptions
    from osstune.infer.batch_output import OutputFile
    from osstune.infer.batch_rows import read_prompts

    log = log or sys.stderr
    # Every option and every row is checked before the model is loaded, which can take minutes.
    config = engine_config(args)
    _sampling(args, max_tokens=args.max_tokens, seed=None)
    if args.adapter and not Path(args.adapter).is_dir():
        raise ValueError(f"{args.adapter}: adapter directory not found (--adapter)")
    rows, problems = read_prompts(args.input, RenderOptions(reasoning_effort=args.reasoning_effort))
    context = _known_context(args.model, args.max_model_len)
    if context is not None:
        long = [r for r in rows if len(r.prompt) >= context]
        problems += [_too_long(args.input, r, context) for r in long]
        rows = [r for r in rows if len(r.prompt) < context]
        problems.sort(key=lambda p: p.line)
    if problems:
        if not args.skip_invalid:
            shown = problems[:20]
            more = f"(and {len(problems) - len(shown)} more) " if len(problems) > len(shown) else ""
            raise DataError(shown, f"{more}fix these rows, or pass --skip-invalid to generate the others")
        print(f"skipping {len(problems)} invalid row(s) (--skip-invalid), the first: {problems[0]}", file=log)
    if not rows:
        raise ValueError(f"{args.input}: no row to generate")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError(f"--output {args.output} is the input file; give another file name")

    total = sum(len(r.prompt) for r in rows)
    print(f"{args.input}: {len(rows)} prompts, {total} tokens (longest {max(len(r.prompt) for r in rows)})", file=log)
    out = OutputFile(args.output, rows, overwrite=args.overwrite, source=args.input)
    if out.num_written:
        print(f"resuming {args.output}: {out.num_written} of {len(rows)} rows are there", file=log)
    if out.num_written == len(rows):
        out.close()
        print(f"nothing to do: all {len(rows)} rows are in {args.output}", file=log)
        return 0
    with out:
        return _generate(args, config, rows, out, log)


def _generate(args, config: EngineConfig, rows, out, log: TextIO) -> int:
    import torch

    from osstune.data.render import harmony_encoding
    from osstune.device import pick_device
    from osstune.serve.engine import LLMEngine, load_for_serving

    encoding = harmony_encoding()
    device = pick_device(args.device)
    print(f"loading {args.model} on {device}", file=log)
    model = load_for_serving(args.model, device=device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    adapters = {"adapter": args.adapter} if args.adapter else None
    engine = LLMEngine(model, config, adapters, log=lambda s: print(s, file=log))
    adapter = "adapter" if args.adapter else None

    start = out.num_written
    tokens: dict[str, list[int]] = {}  # request id -> its tokens so far
    feed = _Feeder(args, engine, rows, start, adapter, out)
    progress = Progress(len(rows), start, log)
    with StopRequest(then="writing its rows", stream=log) as stop:
        try:
            while stop.signal_number is None and feed():
                for u in engine.step():
                    tokens.setdefault(u.request_id, []).extend(u.new_token_ids)
                    if u.finished:
                        pos = int(u.request_id)
                        out.put(pos, _result_record(encoding, rows[pos], tokens.pop(u.request_id), u))
                        feed.in_flight -= 1
                out.sync()
                progress.update(out.num_written + len(out.waiting), engine.stats_totals["generation"])
        finally:
            engine.shutdown()
    finished = out.num_written + len(out.waiting)
    if feed.shortened:
        print(f"{feed.shortened} row(s): --max-tokens lowered to what the context ({engine.max_model_len}) leaves",
              file=log)
    if stop.signal_number is not None:
        out.sync()
        progress.close(finished, engine.stats_totals["generation"])
        raise Interrupted(
            f"stopped: {out.num_written} of {len(rows)} rows are in {args.output}; "
            "run the same command again to generate the rest",
            stop.signal_number,
        )
    out.sync()
    progress.close(finished, engine.stats_totals["generation"])
    if feed.failed:
        print(f"{feed.failed} row(s) could not run (see their \"error\" in {args.output})", file=log)
    print(f"wrote {len(rows)} rows to {args.output}", file=log)
    return 0


class _Feeder:
    """Queues rows on the engine as others finish, keeping `2 x --max-num-seqs` in flight: enough to
    refill every slot of the batch at once, while the engine holds the token lists of those rows only."""

    def __init__(self, args, engine, rows, start: int, adapter: str | None, out) -> None:
        self.args, self.engine, self.rows, self.adapter, self.out = args, engine, rows, adapter, out
        self.next = start
        self.in_flight = 0
        self.window = 2 * engine.config.max_num_seqs
        self.failed = self.shortened = 0

    def __call__(self) -> bool:
        """Queue what fits in the window; False when every row has finished."""
        from osstune.serve.types import RequestError

        while self.in_flight < self.window and self.next < len(self.rows):
            pos, row = self.next, self.rows[self.next]
            self.next += 1
            room = self.engine.max_model_len - len(row.prompt)
            self.shortened += 0 < room < self.args.max_tokens
            params = _sampling(self.args, max_tokens=max(1, min(self.args.max_tokens, room)), seed=row.index)
            try:
                req = self.engine.make_request(row.prompt, params, request_id=str(pos), adapter=self.adapter)
            except RequestError as e:  # this row alone cannot run here (context, KV cache): the others go on
                self.out.put(pos, _error_record(row, str(e)))
                self.failed += 1
                continue
            self.engine.add_checked(req)
            self.in_flight += 1
        return self.in_flight > 0


def _sampling(args, *, max_tokens: int, seed: int | None):
    from osstune.serve.types import RequestError, SamplingParams

    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=None if args.seed is None or seed is None else args.seed + seed,
        )
    except RequestError as e:
        raise ValueError(f"--{(e.field or '').replace('_', '-')}: {e}") from None


def _known_context(model: str, max_model_len: int | None) -> int | None:
    """The context of a preset or a local checkpoint, read without loading weights (None: a hub id,
    whose prompts are checked once it is loaded)."""
    from osstune.config import PRESETS

    if model in PRESETS:
        context = PRESETS[model].max_position_embeddings
    elif (Path(model) / "config.json").is_file():
        from osstune.checkpoint.reader import load_config

        context = load_config(model).max_position_embeddings
    else:
        return None
    if max_model_len and max_model_len > context:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's context ({context})")
    return max_model_len or context


def _too_long(path, row, context: int):
    from osstune.data.errors import Problem

    return Problem(
        str(path), row.line,
        f"the prompt has {len(row.prompt)} tokens; the context is {context}: shorten the conversation",
    )


def _base_record(row) -> dict[str, Any]:
    record: dict[str, Any] = {"id": row.id, "line": row.line}
    if row.reference is not None:
        record["reference"] = row.reference
    return record


def _result_record(encoding, row, tokens: list[int], update) -> dict[str, Any]:
    from osstune.infer.chat import parse_completion

    reply = parse_completion(encoding, tokens, update.finish_reason)
    call = reply.tool_call
    record = _base_record(row) | {
        "final": reply.final,  # the raw decoded text when the output is not valid harmony
        "reasoning": reply.analysis,
        "tool_call": None if call is None else {
            "recipient": call.recipient,
            "content_type": call.content_type,
            "arguments": "".join(getattr(part, "text", "") for part in call.content),
        },
        "finish_reason": update.finish_reason,
        "valid": reply.valid,
        "prompt_tokens": update.num_prompt_tokens,
        "completion_tokens": len(tokens),
        "cached_tokens": update.num_cached_tokens,
        "prompt_sha": row.digest,
    }
    if not reply.valid:
        record["harmony_error"] = reply.error
    return record


def _error_record(row, error: str) -> dict[str, Any]:
    return _base_record(row) | {
        "final": "",
        "reasoning": "",
        "tool_call": None,
        "finish_reason": "error",
        "valid": False,
        "prompt_tokens": len(row.prompt),
        "completion_tokens": 0,
        "cached_tokens": 0,
        "prompt_sha": row.digest,
        "error": error,
    }
