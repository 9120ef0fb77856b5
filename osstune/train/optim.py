"""AdamW with float32 master weights, gradient clipping and the learning-rate schedule."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from osstune.kernels.adam8 import AdamW8bit
from osstune.train.config import OptimConfig

# optim.moments="int8": tensors with fewer values keep float32 moments (bitsandbytes' threshold for
# its 8-bit optimizers): biases, norms and sinks are few bytes and sensitive to their update.
MIN_8BIT_NUMEL = 4096
# float32 moments on the device: gradients are widened to float32 (and stepped) this many values at a
# time, which bounds that copy to 128 MiB.
GRAD_SLICE = 2**25


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: linear warmup, then decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape)


class MasterAdamW:
    """AdamW whose state and update run in float32 even when the model holds bf16 weights.

    Trainable parameters stored in float32 (LoRA weights, everything on the CPU) are their own
    master; lower-precision ones get a float32 copy that receives the gradient, is updated, and is
    copied back after each step, so small updates are not lost to bf16 rounding.

    offload: the masters and AdamW's moments (12 bytes per trainable value) live in host memory,
    pinned on a CUDA machine. Each step copies the gradients into pinned float32 buffers (all copies
    queued, then one wait), clips and updates on the CPU, and copies the new weights back. Every
    parameter then has a separate float32 master, on a CPU-only run too (harmless, and the same code
    as on a GPU). The numbers are the same as without offload, up to the order of float sums (the
    CPU's reductions and AdamW kernels are not the GPU's), and so is the checkpoint state: a run can
    resume with the other setting.

    cfg.moments="int8": AdamW8bit (osstune/kernels/adam8.py) keeps the moments of every master of at
    least MIN_8BIT_NUMEL values in 8 bits (2.03 bytes a value instead of 8), torch.optim.AdamW the
    rest; same update rule, lossy moments. With offload the codes live in host memory beside the
    masters and the update runs on the CPU in plain PyTorch; on a GPU it is one Triton launch.
    """

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        cfg: OptimConfig,
        *,
        offload: bool = False,
        grad_norm: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    ) -> None:
        if not named_params:
            raise ValueError("no trainable parameters: check the method and its targets")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.offload = offload
        # (parameters with gradients) -> their gradients' norm; a sharded run counts each value once
        # over all ranks (osstune.parallel.norm). Default: the gradients as they are.
        self.grad_norm = grad_norm
        if offload:
            self.masters = _host_tensors(self.params)
            for m, p in zip(self.masters, self.params):
                m.copy_(p.detach())
            self.grad_buffers = _host_tensors(self.params)
        else:
            self.masters = [
                p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True) for p in self.params
            ]
        self.cfg = cfg
        hyper = dict(betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.eight_bit = [cfg.moments == "int8" and m.numel() >= MIN_8BIT_NUMEL for m in self.masters]
        float_moments = [m for m, e in zip(self.masters, self.eight_bit) if not e]
        named_8bit = [(n, m) for n, m, e in zip(self.names, self.masters, self.eight_bit) if e]
        self.opt = torch.optim.AdamW(float_moments, lr=cfg.lr, foreach=True, **hyper) if float_moments else None
        self.opt8 = AdamW8bit(named_8bit, **hyper) if named_8bit else None
        if offload and named_8bit and any(p.is_cuda for p in self.params):
            warnings.warn(
                "optim.moments='int8' with memory.optimizer='cpu': the 8-bit update then runs on the CPU, about 10x "
                "slower than float32 AdamW there (1.9 s instead of 0.18 s a step for 92.5M values on 16 cores), and "
                "only saves host memory. Keep the optimizer on the GPU for int8 moments, or use float32 moments with "
                "the optimizer on the host",
                stacklevel=2,
            )

    @torch.no_grad()
    def step(self, lr: float) -> float:
        """Clip, update, and return the gradient norm before clipping."""
        if self.opt is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        if self.offload:
            self._gradients_to_host()
            grads = [m.grad for m in self.masters if m.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(self.masters, self.cfg.max_grad_norm) if grads else torch.zeros(())
            if self.opt is not None:
                self.opt.step()
            if self.opt8 is not None:
                self.opt8.step(lr)
        else:
            norm = self._step_on_device(lr)
        for p, m in zip(self.params, self.masters):
            if m is not p:
                # Host masters: an asynchronous copy from pinned memory, converted on the GPU. The next
                # step's wait (or load_state_tensors') comes before any write to the masters.
                p.copy_(m.to(p.device, non_blocking=True))
        self.zero_grad()
        return float(norm)

    def _step_on_device(self, lr: float) -> torch.Tensor:
        """The step with the masters beside the parameters, without a float32 copy of every gradient
        at once (for LoRA r=8 on gpt-oss-20b's attention and experts that copy is 0.34 GiB, which the
        graphed step's memory pool could not reuse): the norm is taken from the gradients as they are,
        8-bit moments read them and the clipping factor in their kernel, and float32 moments get
        float32 gradients a slice of GRAD_SLICE values at a time. The same numbers as clipping
        float32 copies, then stepping (clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1)."""
        live = [p.grad for p in self.params if p.grad is not None]
        if not live:
            return torch.zeros(())
        norm = _total_norm(live) if self.grad_norm is None else self.grad_norm([p for p in self.params if p.grad is not None])
        scale = (self.cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        if self.opt8 is not None:
            self.opt8.step(lr, grads=[p.grad for p, e in zip(self.params, self.eight_bit) if e], grad_scale=scale)
        if self.opt is not None:
            todo = [(m, p.grad) for p, m, eight_bit in zip(self.params, self.masters, self.eight_bit)
                    if not eight_bit and p.grad is not None]  # fmt: skip
            for m, _ in todo:  # torch's AdamW steps whatever has a gradient: none until its slice
                m.grad = None
            pending, size = [], 0
            for m, grad in todo:
                # A float32 parameter is its own master: its gradient is scaled in place, as clipping does.
                m.grad = grad.mul_(scale) if grad.dtype == torch.float32 else grad.float().mul_(scale)
                pending.append(m)
                size += m.numel()
                if size >= GRAD_SLICE:
                    self._step_float(pending)
                    pending, size = [], 0
            if pending:
                self._step_float(pending)
        return norm

    def _step_float(self, masters: list[torch.Tensor]) -> None:
        """torch's AdamW over the masters that hold a gradient now (it skips the others)."""
        self.opt.step()
        for m in masters:
            m.grad = None

    def _gradients_to_host(self) -> None:
        for p, m, buffer in zip(self.params, self.masters, self.grad_buffers):
            m.grad = None
            if p.grad is not None:
                buffer.copy_(p.grad, non_blocking=True)  # a bf16 gradient is widened on the GPU first
                m.grad = buffer
        _wait_for_copies(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None

    # ---- checkpoint state: tensors for safetensors, scalars for JSON ----
    # A master is saved only where it holds more than the parameter (a lower-precision parameter),
    # so the state is the same with and without offload.

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, p, m in zip(self.names, self.params, self.masters):
            if p.dtype != torch.float32:
                out[f"master/{name}"] = m.detach()
            for key, value in (self.opt.state.get(m, {}) if self.opt is not None else {}).items():
                out[f"adam/{name}/{key}"] = value if value.dim() else value.reshape(1)
        if self.opt8 is not None:
            out.update(self.opt8.state_tensors())
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        _wait_for_copies(self.params)
        with torch.no_grad():
            for name, p, m, eight_bit in zip(self.names, self.params, self.masters, self.eight_bit):
                if m is not p:
                    # A float32 parameter is its own master: it was loaded with the trainable weights.
                    m.copy_(p if p.dtype == torch.float32 else tensors[f"master/{name}"])
                    p.copy_(m)
                if f"{'adam' if eight_bit else 'adam8'}/{name}/step" in tensors:
                    raise ValueError(
                        f"the optimizer state of {name!r} has {'float32' if eight_bit else '8-bit'} moments, this "
                        f"optimizer keeps them in {'8 bits' if eight_bit else 'float32'}: load it with the "
                        "optim.moments it was saved with"
                    )
                state = {}
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    t = tensors.get(f"adam/{name}/{key}")
                    if t is not None:
                        state[key] = t.reshape(()) if key == "step" else t.to(m.device)
                if state:
                    self.opt.state[m] = state
            if self.opt8 is not None:
                self.opt8.load_state_tensors(tensors)


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, accumulated in float32 whatever their dtype (what
    clip_grad_norm_ computes from float32 copies)."""
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def _host_tensors(like: list[torch.Tensor]) -> list[torch.Tensor]:
    """float32 host tensors shaped like `like`: views of one buffer, pinned when any is on a GPU (one
    pinned block instead of one per tensor, each rounded up to a power of two by PyTorch's cache)."""
    flat = torch.empty(sum(t.numel() for t in like), dtype=torch.float32, pin_memory=any(t.is_cuda for t in like))
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def _wait_for_copies(params: list[torch.Tensor]) -> None:
    """Until the copies queued on the parameters' GPUs (gradients out, weights in) are done."""
    for device in {p.device for p in params if p.is_cuda}:
        torch.cuda.current_stream(device).synchronize()
