"""The HTTP face of the serving engine: OpenAI-compatible endpoints, metrics and the web chat page.

Layers, lowest first: `errors`, `fields` (request validation) -> `harmony_io` (messages -> prompt
tokens, output tokens -> content / reasoning / tool calls), `text` (incremental decoding, stop
strings) -> `generation` (one engine request as a stream of deltas) -> the endpoint modules ->
`app` (routes, auth, queue limit) -> `server` (uvicorn). It imports the engine, never the model.
FastAPI and uvicorn are the `serve` extra: only `app` and `server` import them.
"""
