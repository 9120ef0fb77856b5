"""The engine loop, `schedule() -> run() -> update()`, and `LLM` for offline batch generation.

`LLMEngine` owns the scheduler (plain Python), the KV cache manager (block ids) and the model runner
(tensors). `add_request` checks a request completely before it is queued, so a bad request fails
alone with a `RequestError` and the others go on; `step()` runs one forward pass for every scheduled
request and returns the streamed updates; `abort` frees a request's blocks at once.
"""

from __future__ import annotations

import itertools
import random
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from osstune.model import GptOss
from osstune.serve.adapters import AdapterSet
from osstune.serve.backend import Backend
from osstune.serve.config import EngineConfig
from osstune.serve.kv_blocks import KVCacheManager
from osstune.serve.runner import ModelRunner, kv_bytes_per_block, kv_groups
from osstune.serve.scheduler import Request, Scheduler
from osstune.serve.types import EngineStats, RequestError, RequestOutput, SamplingParams

_GIB = 1 << 30


def kv_cache_blocks(model: GptOss, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> int:
    """How many KV blocks the budget holds: `num_kv_blocks`, else `kv_cache_gb`, else (CUDA) the share
    `gpu_memory_utilization` of the GPU's memory minus what is already allocated and a reserve for
    one step's activations and logits; on other devices 1 GiB."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_bytes_per_block(model, config.block_size, dtype)
    if config.kv_cache_gb is not None:
        budget = config.kv_cache_gb * _GIB
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cfg = model.config
        elem = torch.tensor([], dtype=dtype).element_size()
        # Activations of the largest step (the experts' (N*k, 2I) rows dominate) and float32 logits
        # of every sampled row with the sampler's temporaries.
        step = config.max_num_batched_tokens * (cfg.hidden_size * 16 + cfg.num_experts_per_tok * cfg.intermediate_size * 6) * elem
        logits = config.max_num_seqs * cfg.vocab_size * 4 * 6
        # A cap set with torch.cuda.set_per_process_memory_fraction (`--gpu-memory-limit`): size the
        # cache inside it, from what this process holds, since mem_get_info reports the whole card.
        fraction = torch.cuda.get_per_process_memory_fraction(device)
        used = total - free if fraction >= 1.0 else torch.cuda.memory_reserved(device)
        budget = total * fraction * config.gpu_memory_utilization - used - step - logits - _GIB // 2
    else:
        budget = _GIB
    blocks = int(budget // per_block)
    if blocks < 2:
        raise ValueError(
            f"no room for a KV cache: the budget is {budget / _GIB:.2f} GiB after the weights; raise "
            "--gpu-memory-utilization or give --kv-cache-gb"
        )
    return blocks


def _check_expert_scales(model: GptOss) -> None:
    """The MXFP4 kernels take scale bytes up to 192 (larger ones would turn into inf): checked once at
    load, with the tensor named, rather than per step (a check is a device sync)."""
    from osstune.kernels.mxfp4_gemm import check_scales
    from osstune.model import MXFP4Experts

    for name, module in model.named_modules():
        if isinstance(module, MXFP4Experts):
            check_scales(module.gate_up_proj_scales, f"{name}.gate_up_proj_scales")
            check_scales(module.down_proj_scales, f"{name}.down_proj_scales")


class LLMEngine:
    @classmethod
    def from_model(
        cls,
        model: str | GptOss,
        *,
        adapters: dict[str, str | Path] | None = None,
        config: EngineConfig = EngineConfig(),
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        log: Callable[[str], None] | None = None,
    ) -> LLMEngine:
        """An engine over a model object, or over one loaded by `load_for_serving` (a checkpoint
        directory, hub id or preset) on `device` in `dtype`."""
        return cls(load_for_serving(model, device, dtype), config, adapters, log)

    def __init__(
        self,
        model: GptOss,
        config: EngineConfig = EngineConfig(),
        adapters: dict[str, str | Path] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        model.eval()
        self.model = model
        self.config = config
        self.model_config = model.config
        device = model.lm_head.weight.device
        dtype = model.model.embed_tokens.weight.dtype
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        if self.max_model_len > model.config.max_position_embeddings:
            raise ValueError(
                f"EngineConfig.max_model_len={self.max_model_len} exceeds the model's context "
                f"({model.config.max_position_embeddings})"
            )
        self.adapters = AdapterSet()
        for name, path in (adapters or {}).items():
            self.adapters.load(model, name, path)
        num_blocks = kv_cache_blocks(model, config, device, dtype)
        self.kv = KVCacheManager(num_blocks, config.block_size, kv_groups(model), config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        self.backend = Backend.for_device(device, config.kernels, config.cuda_graph_max_batch)
        if self.backend.kernels:
            _check_expert_scales(model)
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.backend, self.adapters)
        if self.backend.cuda_graph_max_batch > 0:
            from osstune.serve.graphs import DecodeGraphs

            graphs = DecodeGraphs(self.runner, min(self.backend.cuda_graph_max_batch, config.max_num_seqs), self.max_model_len)
            graphs.capture()
            self.backend.graphs = graphs
        self._ids = itertools.count()
        self.stats_totals = {"prompt": 0, "generation": 0, "finished": 0}
        if self.backend.kernels and device.type == "cuda":
            self._warm_up()
        report = self.capacity_report(dtype)
        (log or (lambda s: print(s, file=sys.stderr)))(report)

    def _warm_up(self) -> None:
        """Compile the kernels' prefill variants before the first request pays for it: Triton
        specialises a launch on whether its integer sizes divide by 16, so a full chunk, an odd chunk
        and a short prompt beside a decode cover the shapes a running server sees."""
        budget = self.config.max_num_batched_tokens
        lengths = [min(budget, self.max_model_len - 2), 17, min(budget // 2 + 3, self.max_model_len - 2)]
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_stop=True)
        for i, n in enumerate(lengths):
            self.add_request([(7919 * (j + 1) + i) % 199_000 for j in range(n)], params, request_id=f"warm-up-{i}")
        while self.has_unfinished:
            self.step()
        self.stats_totals = {"prompt": 0, "generation": 0, "finished": 0}
        self.scheduler.prefix_hit_tokens_total = 0

    # ---- capacity ----

    def capacity_report(self, dtype: torch.dtype) -> str:
        bs = self.config.block_size
        per_block = kv_bytes_per_block(self.model, bs, dtype)
        usable = self.kv.pool.num_blocks - 1
        ctx = min(self.max_model_len, 8192)
        per_seq = self.kv.max_blocks_needed(ctx, 1)
        graphs = self.backend.graphs
        captured = f"; decode CUDA graphs for {len(graphs.sizes)} batch sizes up to {graphs.sizes[-1]} ({graphs.capture_s:.1f} s)" if graphs else ""
        return (
            f"osstune engine: KV cache {usable * per_block / _GIB:.2f} GiB in {usable} blocks of {bs} tokens "
            f"({self.backend.name} path{captured}); {usable // per_seq} sequences of {ctx} tokens fit at once; "
            f"context up to {self.max_model_len} tokens"
        )

    # ---- requests ----

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams = SamplingParams(),
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> str:
        """Queue a request; raises `RequestError` (naming the field) when it cannot run as given."""
        req = self.make_request(prompt_token_ids, params, request_id, adapter)
        self.scheduler.add(req)
        self.stats_totals["prompt"] += len(req.prompt_token_ids)
        return req.request_id

    def make_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams = SamplingParams(),
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> Request:
        """A checked request, not yet queued (reads nothing that a step changes: safe from any thread)."""
        prompt = list(prompt_token_ids)
        if not prompt:
            raise RequestError("the prompt is empty: give at least one token", field="prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"prompt token id {bad[0]!r} is outside the model's vocabulary [0, {vocab})", field="prompt"
            )
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens; the context is {self.max_model_len}: shorten the prompt",
                field="prompt",
            )
        self.adapters.check(adapter)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        req = Request(rid, prompt, params, seed, adapter)
        self.scheduler.check(req)
        return req

    def add_checked(self, req: Request) -> None:
        """Queue a request from `make_request`."""
        self.scheduler.add(req)
        self.stats_totals["prompt"] += len(req.prompt_token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        return self._final(req, "abort")

    def _final(self, req: Request, reason: str, error: str | None = None) -> RequestOutput:
        new = req.output_token_ids[req.num_emitted :]
        req.num_emitted = len(req.output_token_ids)
        self.stats_totals["finished"] += 1
        return RequestOutput(req.request_id, new, len(req.output_token_ids), len(req.prompt_token_ids), True, reason,
                             req.num_cached_tokens, error)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- the loop ----

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.chunks:
            return []
        sampled = self.runner.execute(out)
        updates = self.scheduler.update(out, sampled)
        for u in updates:
            self.stats_totals["generation"] += len(u.new_token_ids)
            if u.finished:
                self.stats_totals["finished"] += 1
        return updates

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_preempted_total=s.num_preempted_total,
            kv_blocks_total=self.kv.pool.num_blocks - 1,
            kv_blocks_used=self.kv.num_used,
            block_size=self.config.block_size,
            prompt_tokens_total=self.stats_totals["prompt"],
            generation_tokens_total=self.stats_totals["generation"],
            prefix_cache_hit_tokens_total=s.prefix_hit_tokens_total,
            requests_finished_total=self.stats_totals["finished"],
        )

    def shutdown(self) -> list[RequestOutput]:
        """Abort every request; returns their final updates."""
        ids = list(self.scheduler.requests)
        return [o for o in (self.abort(r) for r in ids) if o is not None]


@dataclass
class Completion:
    """One request's result from `LLM.generate`."""

    prompt_token_ids: list[int]
    token_ids: list[int]  # generated, the stop token included when one ended it
    finish_reason: str
    num_cached_tokens: int = 0


def load_for_serving(model: str | GptOss, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> GptOss:
    """A model object, or one loaded from a checkpoint directory, hub id or preset: on CUDA when there
    is one; weights as stored (bf16, MXFP4 experts kept packed) unless `dtype` is given."""
    if isinstance(model, GptOss):
        return model
    import osstune
    from osstune.device import pick_device

    return osstune.load_model(model, device=pick_device(None if device is None else str(device)), dtype=dtype)


class LLM:
    """Offline generation: give it every prompt, get every result back in input order.

    `LLM(model, adapters=..., config=EngineConfig(...), device=..., dtype=..., log=...)`: the options
    of `LLMEngine.from_model`."""

    def __init__(self, model: str | GptOss, **options) -> None:
        self.engine = LLMEngine.from_model(model, **options)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        adapters: Sequence[str | None] | str | None = None,
        on_finish: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """Generate for every prompt; `on_finish(index, completion)` is called as each one finishes
        (in finishing order). Raises `RequestError` before anything runs when a prompt is invalid."""
        n = len(prompts)
        plist = list(params) if isinstance(params, Sequence) else [params] * n
        alist = list(adapters) if isinstance(adapters, Sequence) and not isinstance(adapters, str) else [adapters] * n
        if len(plist) != n or len(alist) != n:
            raise ValueError(f"{n} prompts need as many sampling parameters and adapters")
        eng = self.engine
        index: dict[str, int] = {}
        tokens: list[list[int]] = [[] for _ in range(n)]
        results: list[Completion | None] = [None] * n
        try:
            for i, (prompt, p, a) in enumerate(zip(prompts, plist, alist)):
                try:
                    index[eng.add_request(prompt, p, adapter=a)] = i
                except RequestError as e:
                    raise RequestError(f"prompt {i}: {e}", field=e.field) from None
            while eng.has_unfinished:
                for u in eng.step():
                    i = index[u.request_id]
                    tokens[i].extend(u.new_token_ids)
                    if u.finished:
                        results[i] = Completion(list(prompts[i]), tokens[i], u.finish_reason, u.num_cached_tokens)
                        if on_finish is not None:
                            on_finish(i, results[i])
        finally:
            eng.shutdown()
        return results  # type: ignore[return-value]
