"""`osstune chat`: talk to a model (and optionally a LoRA adapter) in the harmony format."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from osstune.infer.chat import ChatSession
    from osstune.infer.generate import SamplingOptions

_HELP = "commands: /reset starts a new conversation, /exit (or end of input) quits"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a model in the harmony format",
        description="Chat with a gpt-oss model. Without --prompt, reads one message per line from stdin. " + _HELP,
    )
    p.add_argument("--model", help="checkpoint directory, Hugging Face id or preset name (e.g. tiny); with --url: "
                   "the served model id (default: the first one the server lists)")
    p.add_argument("--url", help="talk to a running server (osstune serve, or any OpenAI-compatible one) instead, "
                   "e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("OSSTUNE_API_KEY"), help="with --url (default: $OSSTUNE_API_KEY)")
    p.add_argument("--adapter", help="LoRA adapter directory to apply on top of the model")
    p.add_argument("--prompt", help="send this one message, print the answer and exit")
    p.add_argument("--instructions", help="developer instructions (the developer message of harmony)")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
    p.add_argument("--show-reasoning", action="store_true", help="print the analysis channel too")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="per turn (default: %(default)s)")
    # OpenAI recommends temperature 1.0 and top_p 1.0 for gpt-oss (openai/gpt-oss README); 0 is greedy.
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    p.add_argument("--seed", type=int, help="makes sampling reproducible on one device")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="cast the weights (decodes MXFP4 experts); default: as stored (bf16, MXFP4 experts kept packed)",
    )
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from osstune.infer.generate import SamplingOptions  # imported here: `osstune --help` loads no torch

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    sampling = SamplingOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if getattr(args, "url", None):
        from osstune.infer.remote import RemoteChatSession

        for flag in ("adapter", "device", "dtype"):
            if getattr(args, flag):
                raise ValueError(f"--{flag} is for a local model; with --url the server decides (pick an adapter with --model NAME)")
        session = RemoteChatSession(
            args.url, model=args.model, api_key=args.api_key, reasoning_effort=args.reasoning_effort,
            developer_instructions=args.instructions, sampling=sampling,
        )
        print(f"talking to {session.model} at {session.base}", file=sys.stderr)
        return _converse(session, args, stdin, stdout)
    if not args.model:
        raise ValueError("give --model (a local model) or --url (a running server)")
    return _run_local(args, sampling, stdin, stdout)


def _run_local(args: argparse.Namespace, sampling: SamplingOptions, stdin: TextIO, stdout: TextIO) -> int:
    import torch

    from osstune.device import pick_device
    from osstune.infer.chat import ChatSession, chat_engine
    from osstune.serve.engine import load_for_serving

    if args.adapter and not Path(args.adapter).is_dir():
        # Checked before loading the model, which can take minutes.
        raise ValueError(f"{args.adapter}: adapter directory not found (--adapter)")
    device = pick_device(args.device)
    print(f"loading {args.model} on {device}", file=sys.stderr)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_for_serving(args.model, device=device, dtype=dtype)
    if args.adapter:
        print(f"applying adapter {args.adapter}", file=sys.stderr)
    # The serving engine, sized for this one conversation; the adapter runs beside the base weights.
    adapters = {"adapter": args.adapter} if args.adapter else None
    engine = chat_engine(model, adapters, log=lambda s: print(s, file=sys.stderr))
    session = ChatSession(
        engine,
        reasoning_effort=args.reasoning_effort,
        developer_instructions=args.instructions,
        sampling=sampling,
        adapter="adapter" if args.adapter else None,
    )
    return _converse(session, args, stdin, stdout)


def _converse(session, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    if args.prompt is not None:
        _turn(session, args.prompt, args.show_reasoning, stdout)
        return 0
    interactive = stdin.isatty()
    if interactive:
        print(_HELP, file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; {_HELP}", file=sys.stderr)
            continue
        _send(session, text, args.show_reasoning, stdout)


def _send(session: ChatSession, text: str, show_reasoning: bool, out: TextIO) -> None:
    from osstune.infer.generate import GenerationError
    from osstune.serve.types import RequestError

    try:
        _turn(session, text, show_reasoning, out)
    except (GenerationError, RequestError) as e:  # e.g. the conversation outgrew the context: keep the session alive
        print(f"error: {e} (/reset starts a new conversation)", file=sys.stderr)


def _turn(session: ChatSession, text: str, show_reasoning: bool, out: TextIO) -> None:
    """One message: stream the answer (and the reasoning on request) to `out`, then say what went wrong."""
    shown = {"channel": None}

    def on_text(channel: str | None, delta: str) -> None:
        if channel not in ("analysis", "final") or (channel == "analysis" and not show_reasoning):
            return
        if show_reasoning and channel != shown["channel"]:
            header = "[reasoning]" if channel == "analysis" else "[answer]"
            print(("\n" if shown["channel"] else "") + header, file=out)
        shown["channel"] = channel
        print(delta, end="", file=out, flush=True)

    reply = session.send(text, on_text=on_text)
    if not reply.valid:
        if shown["channel"] is not None:
            print(file=out)  # end the line of what was streamed before the output broke
        print(f"warning: the model's output is not valid harmony ({reply.error}); its raw text:", file=sys.stderr)
        print(reply.final, file=out)
        return
    print(file=out, flush=True)
    if reply.tool_call is not None:
        print(f"(the model called the tool {reply.tool_call.recipient}; osstune chat runs no tools)", file=sys.stderr)
    elif not reply.final:
        if reply.stop_reason == "length":
            limit = session.sampling.max_new_tokens
            print(f"(no final answer within {limit} new tokens: raise --max-new-tokens)", file=sys.stderr)
        else:
            print("(the model ended its turn without a final answer)", file=sys.stderr)
