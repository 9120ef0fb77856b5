"""A training micro-step (forward, loss, backward) recorded once as a CUDA graph and replayed.

Why: at gpt-oss-20b's shape the eager step is bound by the host, not the GPU. At 2,048 tokens it
launches thousands of kernels (small elementwise ones included) and takes 0.38 s for 0.20 s of device
work; a replay launches them all at once (docs/PERFORMANCE.md). Recording once and replaying
for every batch is valid because the fast path never reads a device value on the host: nothing
about the work depends on the data except through device tensors.

Contract of `GraphedStep.__call__(input_ids, position_ids, doc_ids, labels, n_trained)`: the same
effect as the trainer's eager micro-step: the loss sum over trained tokens is returned (a float32
device scalar), and the gradients of (loss sum / n_trained) are accumulated into `.grad`.
- The first `warmup` calls run eagerly (they are real micro-steps; they also compile the kernels),
  on a side stream as PyTorch's capture recipe asks; the next call records, then replays.
- Inputs are copied into static buffers; a batch of another shape runs eagerly. With the embedding
  table in host memory (osstune.offload.HostEmbedding) the rows are looked up outside the graph and
  copied into a static (B, T, H) buffer that the graph reads as `inputs_embeds`.
- Gradients live in static tensors that the graph accumulates into. An optimizer may drop them
  (`p.grad = None`, as MasterAdamW does after its step): the next call puts them back, zeroed.
- The optimizer itself runs eagerly: MasterAdamW reads the gradient norm on the host.

Needs (`why_not_graphed`): a CUDA model whose attention and experts all run on the fast path (the
reference expert loop reads the routing on the host; dense and packed MXFP4 experts, with or without
LoRA, both qualify), no dropout (capture forbids the
checkpoint's RNG bookkeeping, without which a recomputed dropout mask would differ), and layer inputs
kept on the GPU (osstune.offload.ActivationOffload copies them to the host, which a graph cannot record).
The graph's memory pool holds the step's activations between calls, as the caching allocator's
cache otherwise would.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from osstune.errors import OsstuneError
from osstune.fast.hooks import KERNEL_HEAD_DIMS, fast_attention, fast_experts, reference_reason
from osstune.model import Attention, GptOss, MoE
from osstune.offload import ActivationOffload, HostEmbedding

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # hidden (N, H), weight (V, H), labels (N,)


class GraphCaptureError(OsstuneError, RuntimeError):
    pass


def why_not_graphed(model: GptOss) -> str | None:
    """Why the training step of `model` cannot be recorded as a CUDA graph, or None when it can."""
    run = model.execution
    if model.gradient_checkpointing and isinstance(run.checkpoint, ActivationOffload):
        return (
            "layer inputs go to host memory (memory.activations: cpu), copies a CUDA graph cannot record; "
            "the step runs eagerly"
        )
    if not next(model.parameters()).is_cuda:
        return "the model is not on a CUDA device"
    for name, m in model.named_modules():
        if isinstance(m, Attention) and (run.attention is not fast_attention or m.d not in KERNEL_HEAD_DIMS):
            return f"{name} is not on the fast path"
        if isinstance(m, MoE) and (run.experts is not fast_experts or reference_reason(m.experts, True)):
            return f"{name}.experts is not on the fast path"
        if isinstance(m, nn.Dropout) and m.p > 0:
            return f"{name} applies dropout {m.p}"
    return None


def graphed_step(model: GptOss, loss_fn: LossFn, warmup: int = 2) -> GraphedStep | None:
    """A `GraphedStep` for `model`, or None (with a warning naming the reason) when it cannot be graphed
    on a CUDA device; None without a warning off CUDA."""
    reason = why_not_graphed(model)
    if reason is None:
        return GraphedStep(model, loss_fn, warmup)
    if next(model.parameters()).is_cuda:
        warnings.warn(f"training step not recorded as a CUDA graph ({reason}): slower, host-bound steps", stacklevel=2)
    return None


class GraphedStep:
    """See the module docstring."""

    def __init__(self, model: GptOss, loss_fn: LossFn, warmup: int = 2) -> None:
        if warmup < 1:
            raise ValueError(f"warmup={warmup}: at least one eager call must precede the capture")
        self.model, self.loss_fn, self.warmup = model, loss_fn, warmup
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.calls = self.replays = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.shape: tuple[int, ...] | None = None
        # Static input_ids (or embedded rows (B, T, H) with a host-memory table), position_ids, doc_ids,
        # labels, n_trained.
        self.inputs: list[torch.Tensor] = []
        embed = model.model.embed_tokens
        self.host_embedding = embed if isinstance(embed, HostEmbedding) else None
        self.grads: list[torch.Tensor] = []
        self.loss: torch.Tensor | None = None
        self.side = torch.cuda.Stream(device=next(model.parameters()).device)

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        doc_ids: torch.Tensor,
        labels: torch.Tensor,
        n_trained: int,
    ) -> torch.Tensor:
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return self._eager_on_side_stream(input_ids, position_ids, doc_ids, labels, n_trained)
        if self.graph is not None and tuple(input_ids.shape) != self.shape:
            return self._eager(*self._to_device(input_ids, position_ids, doc_ids, labels, n_trained))
        self._attach_grads()
        if self.graph is None:
            self._capture(input_ids, position_ids, doc_ids, labels, n_trained)
        else:
            if self.host_embedding is not None:
                self.host_embedding(input_ids, out=self.inputs[0])
            else:
                self.inputs[0].copy_(input_ids, non_blocking=True)
            for static, new in zip(self.inputs[1:4], (position_ids, doc_ids, labels)):
                static.copy_(new, non_blocking=True)
            self.inputs[4].fill_(float(n_trained))
        self.graph.replay()
        self.replays += 1
        return self.loss.clone()  # the static output is overwritten by the next replay

    def _to_device(self, input_ids, position_ids, doc_ids, labels, n_trained) -> list[torch.Tensor]:
        device = self.params[0].device
        if self.host_embedding is not None:
            tokens = self.host_embedding(input_ids)  # (B, T, H) on the device
        else:
            tokens = input_ids.to(device, non_blocking=True)
        tensors = [t.to(device, non_blocking=True) for t in (position_ids, doc_ids, labels)]
        return [tokens, *tensors, torch.tensor(float(n_trained), device=device)]

    def _eager(self, tokens, position_ids, doc_ids, labels, n_trained) -> torch.Tensor:
        """tokens: input_ids (B, T), or their embedded rows (B, T, H) with a host-memory table."""
        model = self.model
        inputs = {"inputs_embeds": tokens} if self.host_embedding is not None else {"input_ids": tokens}
        hidden = model(**inputs, position_ids=position_ids, doc_ids=doc_ids, return_hidden=True)
        loss_sum = self.loss_fn(hidden.flatten(0, 1), model.lm_head.weight, labels.flatten())
        (loss_sum / n_trained).backward()
        return loss_sum.detach()

    def _eager_on_side_stream(self, *batch) -> torch.Tensor:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            loss = self._eager(*self._to_device(*batch))
        torch.cuda.current_stream().wait_stream(self.side)
        return loss

    def _attach_grads(self) -> None:
        """Point every .grad at its static tensor: zeroed where the optimizer dropped it, holding the
        eager micro-steps' sum where those ran since."""
        if not self.grads:
            self.grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params]
            for p, g in zip(self.params, self.grads):
                p.grad = g
            return
        dropped = []
        for p, g in zip(self.params, self.grads):
            if p.grad is g:
                continue
            if p.grad is None:
                dropped.append(g)
            else:
                g.copy_(p.grad)
            p.grad = g
        if dropped:
            torch._foreach_zero_(dropped)

    def _capture(self, *batch) -> None:
        self.inputs = self._to_device(*batch)
        self.shape = tuple(batch[0].shape)
        # Capture forbids reading the CUDA generator, which the checkpoint does to replay dropout
        # masks; why_not_graphed guarantees there is no dropout to replay.
        previous = self.model.set_execution(self.model.execution.replace(checkpoint_preserve_rng=False))
        torch.cuda.synchronize()
        # The eager warm-up steps left their activations' blocks cached for the side stream; the graph
        # allocates from a private pool of its own, so those blocks would stay reserved beside it for
        # the rest of the run with nothing to use them. (The peak reserved figure is set during the
        # warm-up and does not change: docs/PERFORMANCE.md, QLoRA.)
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.loss = self._eager(*self.inputs)
        except RuntimeError as e:
            raise GraphCaptureError(
                f"recording the training step as a CUDA graph failed ({e}); train without the fast path "
                "(--set fast=never) and report this"
            ) from e
        finally:
            self.model.set_execution(previous)
        self.graph = graph
