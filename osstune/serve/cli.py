"""`osstune serve`: the OpenAI-compatible HTTP server and web chat page over the serving engine."""

from __future__ import annotations

import argparse
import os
import sys

from osstune.serve.flags import add_engine_options, engine_config


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model (and LoRA adapters) over an OpenAI-compatible HTTP API with a web chat page",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/responses, /v1/models, /health, /metrics) with a web chat page at /. Needs `pip install 'osstune[serve]'`.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory, Hugging Face id or preset name (e.g. tiny)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA adapter served as the model id NAME (repeatable)")
    p.add_argument("--served-model-name", help="the base model's id in the API (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s (loopback only; 0.0.0.0 listens on every interface)")
    p.add_argument("--port", type=_port, default=8000, help="default: %(default)s (0: a free port)")
    p.add_argument("--api-key", default=os.environ.get("OSSTUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $OSSTUNE_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="requests queued beyond the engine's running batch before 429 (default: %(default)s)")
    p.add_argument("--access-log", action="store_true", help="log a line per HTTP request")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="cast the weights (default: as stored)")
    add_engine_options(p)
    p.set_defaults(func=run_serve)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535)")
    return int(text)


def parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH (e.g. --adapter persona=runs/demo/run/adapter)")
        if name in adapters:
            raise ValueError(f"--adapter {name}: given twice")
        if not os.path.isdir(path):
            raise ValueError(f"--adapter {spec!r}: {path} is not a directory")
        adapters[name] = path
    return adapters


def run_serve(args: argparse.Namespace) -> int:
    from osstune.serve.http.app import _require_fastapi

    _require_fastapi()  # before loading a model for minutes
    import torch

    from osstune.serve.async_engine import AsyncEngine
    from osstune.serve.http.context import ServerContext
    from osstune.serve.http.server import listen, uvicorn_server

    adapters = parse_adapters(args.adapter)
    if args.max_queue < 0:
        raise ValueError(f"--max-queue {args.max_queue}: must be >= 0")
    config = engine_config(args)
    name = args.served_model_name or args.model
    if name in adapters:
        raise ValueError(f"--adapter {name}: the base model is served under that id; rename the adapter")
    sock = listen(args.host, args.port)  # a port in use is said now, not after the model has loaded
    port = sock.getsockname()[1]
    print(f"osstune serve: loading {args.model}" + (f" with adapters {', '.join(adapters)}" if adapters else ""), file=sys.stderr)
    engine = AsyncEngine.from_model(
        args.model, adapters=adapters, config=config, device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None, log=lambda s: print(s, file=sys.stderr),
    )
    engine.start()
    ctx = ServerContext(engine, name, max_in_flight=config.max_num_seqs + args.max_queue, api_key=args.api_key)
    server = uvicorn_server(ctx, args.host, port, access_log=args.access_log)
    print(f"osstune serve: http://{args.host}:{port}/ (web chat), OpenAI API at http://{args.host}:{port}/v1",
          file=sys.stderr)
    try:
        server.run(sockets=[sock])  # returns after Ctrl-C once in-flight requests are done or cancelled
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled, after its graceful shutdown
    finally:
        engine.shutdown()
    print("osstune serve: stopped", file=sys.stderr)
    return 0
