"""Host memory for what a training step holds but rarely touches: the frozen embedding table and the
layer inputs that gradient checkpointing keeps between the forward and the backward.

Both give the same numbers as without them; they trade GPU memory for PCIe copies.

- `offload_embedding(model)`: the table (201088 x 2880 bf16 = 1.08 GiB for gpt-oss) stays in host
  memory; the rows of a batch are gathered there and only the (B, T, H) result is copied to the
  GPU (11 MiB for 2,048 tokens). A trained table cannot live there: it is refused.
- `offload_activations(model)`: each checkpointed layer's input (B, T, H) goes to pinned host memory
  on a side stream while the layer runs, and comes back (prefetched one layer ahead) when the
  backward recomputes that layer. At 65,536 tokens that is 24 x 360 MiB = 8.4 GiB moved off the GPU
  for gpt-oss-20b. Measured on an H100 (24 gpt-oss-20b layers, MXFP4 experts, LoRA r=8 on
  everything, fast path, one sequence): at 65,536 tokens the peak above the weights fell from 22.6 to
  15.1 GiB and the step went from 10.97 to 11.04 s; at 16,384 tokens 5.66 -> 3.89 GiB, 1.744 ->
  1.751 s. Why not `torch.autograd.graph.save_on_cpu`: non-reentrant `torch.utils.checkpoint`
  keeps its inputs by reference, out of the hooks' reach, and `save_on_cpu` copies synchronously.

Neither can sit inside a recorded CUDA graph: osstune.fast.graphs embeds outside the graph, and
refuses to record a step whose layer inputs go to the host (the step then runs eagerly).

The optimizer's state has its own option (osstune.train.optim.MasterAdamW(offload=True)).

Shape legend: B batch, T tokens, H hidden, V vocab.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from osstune.model import ForwardContext, GptOss


class OffloadError(ValueError):
    pass


class HostEmbedding(nn.Module):
    """A frozen embedding whose table stays in host memory; its output goes to `device`.

    The table is a plain attribute, not a parameter or buffer, so `model.to(...)`, `.cuda()` and
    optimizers leave it where it is; a dtype conversion of the model (`.to(torch.bfloat16)`) does
    convert it, on the host, and a device move changes where the rows go. It is still saved and
    loaded as `<prefix>weight` (`model.embed_tokens.weight`), so checkpoints, adapters and export
    see the usual names.

    The table itself is not pinned: the CPU reads it, the copy engine never does. The gathered rows
    are, so their copy to the GPU is asynchronous.
    """

    def __init__(self, weight: torch.Tensor, device: torch.device | str) -> None:
        super().__init__()
        if weight.requires_grad:
            raise OffloadError(
                "the embedding table (model.embed_tokens.weight) is trainable; a table kept in host memory is "
                "frozen. Freeze it (e.g. full_targets that leave out embed_tokens) or keep it on the GPU "
                "(memory.embedding: gpu)"
            )
        self.weight = weight.detach().to("cpu")  # (V, H)
        self.device = torch.device(device)

    def forward(self, input_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), best on the host (ids on a GPU are copied back first, a sync) ->
        (B, T, H) on `self.device`, or written into `out` (B, T, H) on that device."""
        ids = input_ids.cpu().reshape(-1)
        shape = (*input_ids.shape, self.weight.shape[1])
        if self.device.type == "cpu":
            rows = F.embedding(ids, self.weight).view(shape)
            return rows if out is None else out.copy_(rows)
        # From PyTorch's pinned-memory cache: a block is reused only after its copy has finished.
        staged = torch.empty(shape, dtype=self.weight.dtype, pin_memory=True)
        torch.index_select(self.weight, 0, ids, out=staged.view(-1, shape[-1]))
        if out is None:
            return staged.to(self.device, non_blocking=True)
        return out.copy_(staged, non_blocking=True)

    def _apply(self, fn: Callable, recurse: bool = True) -> HostEmbedding:
        # Module.to / .cuda / .half reach the table only through here. A probe shows what `fn` does:
        # its dtype is followed (on the host), its device becomes where the rows go.
        probe = fn(torch.empty(0, dtype=self.weight.dtype))
        if probe.dtype != self.weight.dtype:
            self.weight = self.weight.to(probe.dtype)
        self.device = probe.device
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + "weight"
        if key in unexpected_keys:  # the base class knows no tensor of that name
            unexpected_keys.remove(key)
        if key not in state_dict:
            missing_keys.append(key)
        elif state_dict[key].shape != self.weight.shape:
            error_msgs.append(f"size mismatch for {key}: {tuple(state_dict[key].shape)} in the state dict, "
                              f"{tuple(self.weight.shape)} in the model")
        else:
            with torch.no_grad():
                self.weight.copy_(state_dict[key])

    def extra_repr(self) -> str:
        v, h = self.weight.shape
        return f"{v}, {h}, table on the host, rows to {self.device}"


def offload_embedding(model: GptOss, device: torch.device | str | None = None) -> HostEmbedding:
    """Replace `model.model.embed_tokens` with a `HostEmbedding` holding the same (frozen) table.

    device: where the looked-up rows go; default where the table is now. Call it after choosing what
    trains (a trainable table is refused). A later `model.to(...)` leaves the table on the host.
    """
    embed = model.model.embed_tokens
    if isinstance(embed, HostEmbedding):
        if device is not None:
            embed.device = torch.device(device)
        return embed
    if type(embed) is not nn.Embedding:
        raise OffloadError(
            f"model.embed_tokens is a {type(embed).__name__}; only a plain nn.Embedding can move to the host"
        )
    host = HostEmbedding(embed.weight, device if device is not None else embed.weight.device)
    model.model.embed_tokens = host
    return host


# ---- layer inputs in host memory ----


def offload_activations(model: GptOss) -> ActivationOffload:
    """Checkpoint `model`'s layers with their inputs in host memory (see `ActivationOffload`): the
    `checkpoint` field of `model.execution`, the other fields kept. Takes effect where the per-layer
    checkpoint would: `model.gradient_checkpointing` on, training. Undo:
    `model.set_execution(model.execution.replace(checkpoint=None))`."""
    run = model.execution
    if not isinstance(run.checkpoint, ActivationOffload):
        run = run.replace(checkpoint=ActivationOffload())
        model.set_execution(run)
    return run.checkpoint


@dataclass(eq=False)
class _Stash:
    """One layer's input between its forward and its backward."""

    host: torch.Tensor | None  # (B, T, H): pinned copy of a GPU input, or a CPU input itself
    device: torch.device
    rng: tuple[torch.Tensor, torch.Tensor | None]  # CPU and device generator states at the forward
    before: _Stash | None  # the previous layer of the same forward, prefetched by this one's backward
    fetched: torch.Tensor | None = None  # (B, T, H) back on the GPU, allocated on the copy stream
    arrived: torch.cuda.Event | None = None


class ActivationOffload:
    """`ExecutionPolicy.checkpoint` that keeps each layer's input in host memory.

    Forward: the layer runs without building a graph (as torch's checkpoint does) while its input
    is copied to pinned host memory on a side stream. Backward: the input comes back, the layer is
    recomputed with the forward's RNG state (dropout masks repeat) and differentiated, and the
    previous layer's input is already being copied in, so the copies overlap the computation.

    The layer's trainable parameters are inputs of the autograd node, so their gradients reach
    `.grad` through the usual engine (and `torch.autograd.grad`), as with torch's checkpoint.
    Differences from `torch.utils.checkpoint`: the policy's `checkpoint_context` (selective policies)
    does not apply, autocast is not replayed (osstune trains without it), and a graph can be
    backpropagated once (no retain_graph). The policy's attention and experts functions (osstune.fast)
    are called inside the layer as usual.
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: tuple[weakref.ref, weakref.ref] | None = None  # (ForwardContext, _Stash) of the last call

    def __call__(self, layer: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.cache is not None:
            raise OffloadError(
                "layer inputs are offloaded for training only; a forward with a KV cache has no backward"
            )
        params = [p for p in layer.parameters() if p.requires_grad]
        return _OffloadedLayer.apply(x, layer, ctx, self, *params)

    def __deepcopy__(self, memo) -> ActivationOffload:
        return ActivationOffload()  # streams and stashes belong to the original's passes

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def stash(self, x: torch.Tensor, ctx: ForwardContext) -> _Stash:
        """Start copying x (B, T, H) to the host; link it to the previous layer of the same pass."""
        before = None
        if self._last is not None and self._last[0]() is ctx:
            before = self._last[1]()
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        if not x.is_cuda:
            stash = _Stash(x.detach(), x.device, rng, before)
        else:
            side, current = self.stream(x.device), torch.cuda.current_stream(x.device)
            side.wait_stream(current)  # x has been computed
            with torch.cuda.stream(side):
                host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                host.copy_(x, non_blocking=True)
            x.record_stream(side)  # x's memory is not reused before the copy has read it
            stash = _Stash(host, x.device, rng, before)
        self._last = (weakref.ref(ctx), weakref.ref(stash))
        return stash

    def prefetch(self, stash: _Stash) -> None:
        """Start copying a stashed input back to its GPU (no-op on the CPU or when started)."""
        if stash.fetched is not None or stash.host is None or stash.device.type != "cuda":
            return
        side = self.stream(stash.device)
        # On the copy stream, after the device-to-host copy; the block it gets is free on that stream.
        with torch.cuda.stream(side):
            stash.fetched = stash.host.to(stash.device, non_blocking=True)
            stash.arrived = torch.cuda.Event()
            stash.arrived.record(side)
        stash.host = None

    def fetch(self, stash: _Stash) -> torch.Tensor:
        """The stashed input on its device, ready on the current stream; prefetches the layer before."""
        if stash.host is None and stash.fetched is None:
            raise RuntimeError("backward through an offloaded layer ran twice; retain_graph is not supported "
                               "with layer inputs in host memory (memory.activations: cpu)")
        if stash.device.type != "cuda":
            x, stash.host = stash.host, None
            return x
        self.prefetch(stash)
        if stash.before is not None:
            self.prefetch(stash.before)
        current = torch.cuda.current_stream(stash.device)
        current.wait_event(stash.arrived)
        x, stash.fetched = stash.fetched, None
        x.record_stream(current)  # allocated on the copy stream, used and freed on this one
        return x


class _OffloadedLayer(torch.autograd.Function):
    """y = layer(x, ctx) with x kept in host memory until the backward recomputes the layer."""

    @staticmethod
    def forward(autograd_ctx, x, layer, ctx, offload, *params):
        autograd_ctx.layer, autograd_ctx.fctx, autograd_ctx.offload = layer, ctx, offload
        autograd_ctx.stash = offload.stash(x, ctx)
        autograd_ctx.save_for_backward(*params)
        return layer(x, ctx)  # grad mode is off in a Function's forward: no graph is kept

    @staticmethod
    def backward(autograd_ctx, grad_y):
        stash, offload = autograd_ctx.stash, autograd_ctx.offload
        x = offload.fetch(stash).detach().requires_grad_(autograd_ctx.needs_input_grad[0])
        params = autograd_ctx.saved_tensors
        cpu_rng, device_rng = stash.rng
        devices = [stash.device] if device_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(cpu_rng)
            if device_rng is not None:
                torch.cuda.set_rng_state(device_rng, stash.device)
            with torch.enable_grad():
                y = autograd_ctx.layer(x, autograd_ctx.fctx)
        stash.before = None
        wanted = ([x] if x.requires_grad else []) + list(params)
        grads = list(torch.autograd.grad(y, wanted, grad_y, allow_unused=True))
        grad_x = grads.pop(0) if x.requires_grad else None
        return (grad_x, None, None, None, *grads)
