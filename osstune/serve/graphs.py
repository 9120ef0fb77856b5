"""CUDA graphs for decode steps: one recorded forward pass per batch-size bucket, replayed with the
step's inputs copied into static buffers. A decode step of gpt-oss-20b launches ~30 kernels a layer;
replaying them as one graph removes the host's launch time, which at batch 1 is larger than the GPU's.

Padding rows (a bucket larger than the batch) are sequences of one token in the null block 0: they
write their keys there and attend to it, and their logits are dropped. Steps with a prefill chunk or
an adapter run eagerly (their shapes vary; an adapter's slice is host-driven).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from osstune.serve.runner import ModelRunner, StepInputs
    from osstune.serve.scheduler import SchedulerOutput

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, max_model_len: int) -> None:
        self.runner = runner
        self.sizes = [b for b in BUCKETS if b <= max_batch] or [1]
        dev = runner.device
        n = self.sizes[-1]
        self.width = -(-max_model_len // runner.block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = {g: torch.zeros(n, dtype=torch.long, device=dev) for g in runner.groups}
        self.tables = {g: torch.zeros(n, self.width, dtype=torch.int32, device=dev) for g in runner.groups}
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, dtype=torch.long, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.capture_s = 0.0

    def _inputs(self, b: int) -> StepInputs:
        from osstune.serve.runner import StepInputs

        return StepInputs(
            input_ids=self.input_ids[:b],
            positions=self.positions[:b],
            slots={g: s[:b] for g, s in self.slots.items()},
            block_tables={g: t[:b] for g, t in self.tables.items()},
            seq_lens=self.seq_lens[:b],
            cu_seqlens_q=self.cu[: b + 1],
            max_query_len=1,
            sample_rows=self.rows[:b],
            adapter_slices=[],
            host_seqs=[],
        )

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        runner = self.runner
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):  # largest first: smaller graphs reuse its pool
                inp = self._inputs(b)
                for _ in range(2):  # compile and autotune outside the capture
                    runner.logits(runner.forward(inp), inp.sample_rows)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    logits = runner.logits(runner.forward(inp), inp.sample_rows)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[b] = (graph, logits)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0

    def can_run(self, inp: StepInputs, out: SchedulerOutput) -> bool:
        n = len(out.chunks)
        return (
            bool(self.graphs)
            and out.is_decode_only
            and not inp.adapter_slices
            and n <= self.sizes[-1]
            and all(t.shape[1] <= self.width for t in inp.block_tables.values())
        )

    def run(self, inp: StepInputs) -> torch.Tensor:
        n = inp.input_ids.shape[0]
        b = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(inp.input_ids)
        self.positions[:n].copy_(inp.positions)
        self.seq_lens[:n].copy_(inp.seq_lens)
        for g in self.runner.groups:
            self.slots[g][:n].copy_(inp.slots[g])
            w = inp.block_tables[g].shape[1]
            self.tables[g][:n, :w].copy_(inp.block_tables[g])
        if b > n:  # padding rows: one token at position 0 in the null block
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.seq_lens[n:b].fill_(1)
            for g in self.runner.groups:
                self.slots[g][n:b].zero_()
                self.tables[g][n:b, 0].zero_()
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:n]

