"""AdamW with 8-bit moments: block-wise dynamic quantization (Dettmers et al. 2022, "8-bit Optimizers
via Block-wise Quantization", arXiv:2110.02861).

Each moment is cut into blocks of BLOCK values (the tensor flattened, its last block padded with
zeros); a block stores one float32 absmax and one byte per value, the index of the nearest entry of
a 256-entry map of [-1, 1] (exp_avg, int8 codes) or [0, 1] (exp_avg_sq, uint8 codes) times that
absmax. 2 + 8 / BLOCK bytes a value instead of float32 AdamW's 8. The maps are the paper's dynamic
(tree) quantization: an entry's leading zero bits after the sign give its decade 10^-e, the bits
after the first 1 a linear fraction in (0.1, 1] of that decade, so small values keep relative
precision and the largest keep absolute precision.

A step decodes both moments, does torch.optim.AdamW's float32 math (decoupled weight decay, bias
correction, eps outside the square root) on the master weights, and re-encodes the new moments to
the nearest code, deterministically (no stochastic rounding): a run resumes bit for bit from its
codes. The one exception to nearest: a positive second moment never becomes code 0 (see
`_encode`). On CUDA one Triton launch updates every tensor (osstune/kernels/_adam8_triton.py);
elsewhere `_step_torch` does the same in plain PyTorch, in chunks so that the float32 temporaries
stay small next to the state.

Shape legend: N values of a tensor, B blocks (ceil(N / BLOCK)), BLOCK values a block.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

from osstune.kernels._backend import triton_usable

BLOCK = 256
# Values the plain-PyTorch path decodes at a time: its float32 temporaries (a few of this size)
# stay at a few MiB whatever the tensor.
CHUNK = 2**20
# Gradient element types the Triton kernel reads (its GRAD_KIND).
_GRAD_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.cache
def _tree_magnitudes(decades: int, top_fraction_bits: int) -> tuple[float, ...]:
    """The positive entries of a dynamic tree map, ascending: decade e (0 = the top) holds
    2^(top_fraction_bits - e) linear steps over (0.1, 1] times 10^-e."""
    out = []
    for e in range(decades):
        steps = 2 ** (top_fraction_bits - e)
        out += [10.0**-e * (0.1 + 0.9 * k / steps) for k in range(1, steps + 1)]
    return tuple(sorted(out))


@functools.cache
def _maps() -> tuple[torch.Tensor, torch.Tensor]:
    # Signed: a sign bit and 7 bits, decades 1 .. 1e-6 (127 magnitudes). The pattern that would be
    # -0 stands for -1e-7, so the 256 codes are distinct and an int8 code has its value's sign:
    # code c <-> signed[c + 128], code 0 <-> 0.0.
    pos = _tree_magnitudes(7, 6)
    signed = [-x for x in reversed(pos)] + [-1e-7, 0.0] + list(pos)
    # Unsigned (exp_avg_sq >= 0): no sign bit, so 8 bits: decades 1 .. 1e-7; code 0 <-> 0.0.
    unsigned = [0.0] + list(_tree_magnitudes(8, 7))
    return torch.tensor(signed, dtype=torch.float32), torch.tensor(unsigned, dtype=torch.float32)


def signed_map() -> torch.Tensor:
    """(256,) float32, ascending, in [-1, 1]: exp_avg's code c (int8) stands for signed_map()[c + 128]."""
    return _maps()[0].clone()


def unsigned_map() -> torch.Tensor:
    """(256,) float32, ascending, in [0, 1]: exp_avg_sq's code c (uint8) stands for unsigned_map()[c]."""
    return _maps()[1].clone()


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """(signed map, its 255 midpoints, unsigned map, its midpoints) on `device`."""
    out = []
    for table in _maps():
        out += [table.to(device), ((table[1:] + table[:-1]) / 2).to(device)]
    return tuple(out)


def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B * BLOCK,) float32 -> (codes (B * BLOCK,) int8 if signed else uint8, absmax (B,) float32):
    each value's nearest code after division by its block's absmax."""
    x_BK = x.view(-1, BLOCK)
    absmax = x_BK.abs().amax(dim=1)
    codes = _encode(x_BK, absmax, signed)
    return codes.view(-1), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """codes (B * BLOCK,) int8 or uint8, absmax (B,) -> float32 (B * BLOCK,)."""
    signed = codes.dtype == torch.int8
    return _decode(codes.view(-1, BLOCK), absmax, signed).view(-1)


def _decode(codes_BK: torch.Tensor, absmax_B: torch.Tensor, signed: bool) -> torch.Tensor:
    smap, _, umap, _ = _tables(codes_BK.device)
    index = codes_BK.long() + 128 if signed else codes_BK.long()
    return (smap if signed else umap)[index] * absmax_B[:, None]


def _encode(x_BK: torch.Tensor, absmax_B: torch.Tensor, signed: bool) -> torch.Tensor:
    _, smid, _, umid = _tables(x_BK.device)
    scaled = x_BK / torch.where(absmax_B > 0, absmax_B, 1.0)[:, None]
    # right=False: the number of midpoints strictly below the value, i.e. the lower code at a tie.
    index = torch.bucketize(scaled, smid if signed else umid)
    if signed:
        return (index - 128).to(torch.int8)
    # A positive second moment never rounds to 0: that would divide its first moment by eps alone
    # (the zero-point problem of Li et al. 2023, "Memory Efficient Optimizers with 4-bit States").
    index = torch.where((x_BK > 0) & (index == 0), 1, index)
    return index.to(torch.uint8)


class AdamW8bit:
    """AdamW over float32 tensors (contiguous, on one device) with 8-bit moments.

    step(lr) updates the tensors that have a .grad, as torch.optim.AdamW does (a tensor without one
    keeps its state and step count). step(lr, grads=, grad_scale=) reads the gradients from `grads`
    instead (one per tensor or None; float32, bf16 or fp16, e.g. a bf16 model's own gradients
    without float32 copies) and multiplies them by the float32 scalar tensor `grad_scale` (a
    clipping factor) as it reads them: the same numbers as scaling float32 copies first. The state lives in four flat buffers (codes and absmax of each
    moment), tensor i owning blocks first[i] .. first[i + 1]. kernel: "auto" = the Triton kernel on
    CUDA when Triton can run there, plain PyTorch otherwise; "triton" / "torch" force one (tests:
    "triton" on the CPU runs under TRITON_INTERPRET=1).
    """

    def __init__(
        self,
        named_params: list[tuple[str, torch.Tensor]],
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        kernel: Literal["auto", "triton", "torch"] = "auto",
    ) -> None:
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        assert self.params and all(p.dtype == torch.float32 and p.is_contiguous() for p in self.params)
        self.device = self.params[0].device
        assert all(p.device == self.device for p in self.params)
        self.betas, self.eps, self.weight_decay, self.kernel = betas, eps, weight_decay, kernel
        blocks = [math.ceil(p.numel() / BLOCK) for p in self.params]
        self.first = [0]
        for b in blocks:
            self.first.append(self.first[-1] + b)
        total = self.first[-1]
        # Code 0 is 0.0 in both maps: zeroed buffers are AdamW's zero initial moments.
        self.exp_avg_codes = torch.zeros(total * BLOCK, dtype=torch.int8, device=self.device)
        self.exp_avg_sq_codes = torch.zeros(total * BLOCK, dtype=torch.uint8, device=self.device)
        self.exp_avg_absmax = torch.zeros(total, dtype=torch.float32, device=self.device)
        self.exp_avg_sq_absmax = torch.zeros(total, dtype=torch.float32, device=self.device)
        self.steps = [0] * len(self.params)
        self._launch_tables: tuple[torch.Tensor, ...] | None = None

    @torch.no_grad()
    def step(self, lr: float, grads: list[torch.Tensor | None] | None = None, grad_scale: torch.Tensor | None = None) -> None:
        if grads is None:
            grads = [p.grad for p in self.params]
        assert len(grads) == len(self.params)
        live = [g is not None for g in grads]
        if not any(live):
            return
        if grad_scale is None:
            grad_scale = torch.ones((), device=self.device)
        beta1, beta2 = self.betas
        step_size, bc2_sqrt = [], []
        for i, has_grad in enumerate(live):
            self.steps[i] += has_grad
            t = max(self.steps[i], 1)  # 0: a tensor never stepped, skipped below
            # Python floats, as torch.optim.AdamW computes its bias corrections.
            step_size.append(lr / (1 - beta1**t))
            bc2_sqrt.append((1 - beta2**t) ** 0.5)
        scalars = dict(decay=1 - lr * self.weight_decay, beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2,
                       one_minus_beta2=1 - beta2, eps=self.eps)  # fmt: skip
        use_triton = self.kernel == "triton" or (
            self.kernel == "auto" and self.device.type == "cuda" and triton_usable(self.params[0])
        )
        if use_triton:
            self._step_triton(grads, grad_scale, step_size, bc2_sqrt, scalars)
        else:
            for i, g in enumerate(grads):
                if g is not None:
                    self._step_torch(i, g, grad_scale, step_size[i], bc2_sqrt[i], **scalars)

    def _slices(self, i: int, start: int, end: int) -> tuple[slice, slice]:
        """(code slice, absmax slice) of tensor i's values start .. end (start a multiple of BLOCK)."""
        b0 = self.first[i] + start // BLOCK
        b1 = self.first[i] + math.ceil(end / BLOCK)
        return slice(b0 * BLOCK, b1 * BLOCK), slice(b0, b1)

    def _step_torch(self, i: int, grad: torch.Tensor, grad_scale: torch.Tensor, step_size: float, bc2_sqrt: float, *,
                    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps) -> None:  # fmt: skip
        w_all, g_all = self.params[i].view(-1), grad.reshape(-1)
        n = w_all.numel()
        for start in range(0, n, CHUNK):
            end = min(n, start + CHUNK)
            codes, blocks = self._slices(i, start, end)
            pad = (codes.stop - codes.start) - (end - start)
            w = w_all[start:end]
            g = torch.nn.functional.pad(g_all[start:end].float() * grad_scale, (0, pad)).view(-1, BLOCK)  # (B, BLOCK)
            m = _decode(self.exp_avg_codes[codes].view(-1, BLOCK), self.exp_avg_absmax[blocks], signed=True)
            v = _decode(self.exp_avg_sq_codes[codes].view(-1, BLOCK), self.exp_avg_sq_absmax[blocks], signed=False)
            # The same operations in the same order as the Triton kernel.
            m = beta1 * m + one_minus_beta1 * g
            v = beta2 * v + one_minus_beta2 * g * g
            # torch's vectorised float32 sqrt on the CPU is not always correctly rounded; through
            # float64 it is, like the kernel's sqrt_rn: the two paths then agree bit for bit.
            denom = v.double().sqrt().float() / bc2_sqrt + eps
            update = (step_size * (m / denom)).view(-1)[: end - start]
            w.copy_(w * decay - update)
            for x, codes_buf, absmax_buf, signed in (
                (m, self.exp_avg_codes, self.exp_avg_absmax, True),
                (v, self.exp_avg_sq_codes, self.exp_avg_sq_absmax, False),
            ):
                absmax = x.abs().amax(dim=1)
                codes_buf[codes] = _encode(x, absmax, signed).view(-1)
                absmax_buf[blocks] = absmax

    def _step_triton(self, grads: list[torch.Tensor | None], grad_scale: torch.Tensor, step_size: list[float],
                     bc2_sqrt: list[float], scalars: dict) -> None:  # fmt: skip
        from osstune.kernels import _adam8_triton as kern

        if self._launch_tables is None:
            owner = torch.repeat_interleave(
                torch.arange(len(self.params), dtype=torch.int32),
                torch.tensor([b - a for a, b in zip(self.first, self.first[1:])]),
            )
            first = torch.tensor(self.first[:-1], dtype=torch.int64)
            numel = torch.tensor([p.numel() for p in self.params], dtype=torch.int64)
            self._launch_tables = tuple(t.to(self.device) for t in (owner, first, numel))
        owner, first, numel = self._launch_tables
        # Addresses every step: gradients may be new tensors each time (0 = no gradient: skipped).
        # One element type for all of them: theirs when they share one, else float32 copies.
        kinds = {g.dtype for g in grads if g is not None}
        kind = kinds.pop() if len(kinds) == 1 and kinds <= set(_GRAD_KINDS) else torch.float32
        grads = [None if g is None else g.to(kind).contiguous() for g in grads]
        addr = torch.tensor(
            [p.data_ptr() for p in self.params] + [0 if g is None else g.data_ptr() for g in grads],
            dtype=torch.int64,
        ).to(self.device)
        hyper = torch.tensor([step_size, bc2_sqrt], dtype=torch.float32).to(self.device)  # (2, T)
        smap, smid, umap, umid = _tables(self.device)
        n = len(self.params)
        kern._adamw8_blocks[(self.first[-1],)](
            owner, first, numel, addr[:n], addr[n:], grad_scale.float(), hyper[0], hyper[1],
            self.exp_avg_codes, self.exp_avg_absmax, self.exp_avg_sq_codes, self.exp_avg_sq_absmax,
            smap, smid, umap, umid,
            scalars["decay"], scalars["beta1"], scalars["one_minus_beta1"], scalars["beta2"],
            scalars["one_minus_beta2"], scalars["eps"],
            GRAD_KIND=_GRAD_KINDS[kind], BLOCK=BLOCK, num_warps=2,
        )  # fmt: skip
        del grads  # kept alive until the launch is queued; the allocator orders later reuse after it

    # ---- checkpoint state ----

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, name in enumerate(self.names):
            codes, blocks = self._slices(i, 0, self.params[i].numel())
            out[f"adam8/{name}/exp_avg_codes"] = self.exp_avg_codes[codes]
            out[f"adam8/{name}/exp_avg_absmax"] = self.exp_avg_absmax[blocks]
            out[f"adam8/{name}/exp_avg_sq_codes"] = self.exp_avg_sq_codes[codes]
            out[f"adam8/{name}/exp_avg_sq_absmax"] = self.exp_avg_sq_absmax[blocks]
            out[f"adam8/{name}/step"] = torch.tensor([self.steps[i]], dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Loads the state of every tensor whose keys are in `tensors`; the others keep theirs."""
        for i, name in enumerate(self.names):
            if f"adam8/{name}/step" not in tensors:
                continue
            codes, blocks = self._slices(i, 0, self.params[i].numel())
            self.exp_avg_codes[codes] = tensors[f"adam8/{name}/exp_avg_codes"].to(self.device)
            self.exp_avg_absmax[blocks] = tensors[f"adam8/{name}/exp_avg_absmax"].to(self.device)
            self.exp_avg_sq_codes[codes] = tensors[f"adam8/{name}/exp_avg_sq_codes"].to(self.device)
            self.exp_avg_sq_absmax[blocks] = tensors[f"adam8/{name}/exp_avg_sq_absmax"].to(self.device)
            self.steps[i] = int(tensors[f"adam8/{name}/step"].reshape(()))
