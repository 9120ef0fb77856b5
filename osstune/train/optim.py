"""AdamW with float32 master weights, gradient clipping and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from osstune.train.config import OptimConfig


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
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> None:
        if not named_params:
            raise ValueError("no trainable parameters: check the method and its targets")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.masters = [
            p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True) for p in self.params
        ]
        self.cfg = cfg
        self.opt = torch.optim.AdamW(
            self.masters, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=True
        )

    @torch.no_grad()
    def step(self, lr: float) -> float:
        """Clip, update, and return the gradient norm before clipping."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        grads = [m.grad for m in self.masters if m.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(self.masters, self.cfg.max_grad_norm) if grads else torch.zeros(())
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)
        self.zero_grad()
        return float(norm)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None

    # ---- checkpoint state: tensors for safetensors, scalars for JSON ----

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, p, m in zip(self.names, self.params, self.masters):
            if m is not p:
                out[f"master/{name}"] = m.detach()
            for key, value in self.opt.state.get(m, {}).items():
                out[f"adam/{name}/{key}"] = value if value.dim() else value.reshape(1)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p, m in zip(self.names, self.params, self.masters):
                if m is not p:
                    m.copy_(tensors[f"master/{name}"])
                    p.copy_(m)
                state = {}
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    t = tensors.get(f"adam/{name}/{key}")
                    if t is not None:
                        state[key] = t.reshape(()) if key == "step" else t.to(m.device)
                if state:
                    self.opt.state[m] = state
