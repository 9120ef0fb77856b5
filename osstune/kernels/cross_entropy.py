"""Linear + cross-entropy over a large vocabulary without the full (N, V) logits.

gpt-oss's vocabulary has 201,088 entries: at 8,192 tokens the float32 logits alone take 6.6 GB, and
the unfused loss keeps several such tensors alive for the backward. Here the tokens are processed in
chunks of `chunk_size` rows: per chunk, logits = hidden @ W.T (bf16 operands, float32 result), the
log-sum-exp, the loss and the gradient wrt the logits (softmax - onehot) in one Triton pass, then the
gradients wrt hidden (g @ W) and W (g.T @ hidden, accumulated in float32) right away. The chunk's
logits are then dropped, so peak memory is one chunk of logits instead of all of them.

Choice: the gradients are computed inside the forward rather than recomputing the logits in the
backward. That costs the same GEMMs as an unfused loss (2 with a frozen lm_head, 3 with a trained
one) instead of 3 or 4, and the backward only scales them by the incoming gradient. The forward thus
does the backward's work: call it only when a backward follows (with no input that requires grad, or
under torch.no_grad, the gradient work is skipped).

`chunked_cross_entropy_sum` returns (sum of token losses, number of trained tokens) so that gradient
accumulation can divide by the total over micro-batches; `chunked_cross_entropy` is the mean. With
no trained token the mean is 0 (not NaN, unlike F.cross_entropy), so such a batch adds no gradient.

Shape legend: N tokens, H hidden, V vocabulary, C chunk rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from osstune.kernels._backend import triton_usable

# A chunk holds its float32 logits; on a GPU the gradient wrt them is written over them in place (a
# bf16 gradient in the first half of each row's bytes), so a chunk costs 4 bytes per (row,
# vocabulary entry): 0.8 MB a row at gpt-oss's 201,088 entries. The default chunk is the rows that
# fit in this budget (256 at that vocabulary): at 2,048 rows a single chunk would hold 1.5 GiB,
# a tenth of a QLoRA run's whole memory. Smaller chunks re-read the weight more often (1.16 GB a
# chunk, forward and gradient), which costs little next to the chunk's GEMMs (docs/KERNELS.md).
# With a trained weight every chunk also reads and writes the float32 (V, H) gradient buffer (4.6
# GB of traffic, ~1.4 ms on an H100), so small chunks cost more than they save: 384 rows took 1.65x
# the time of 2,048 there (docs/KERNELS.md); such a chunk is 2,048 rows.
CHUNK_BUDGET = 256 * 2**20
TRAINED_WEIGHT_CHUNK = 2048


def default_chunk_rows(vocab: int, budget: int = CHUNK_BUDGET) -> int:
    """Rows per chunk whose float32 logits fit in `budget` bytes: a multiple of 128 (full GEMM
    tiles), at least 128."""
    return max(128, budget // (4 * vocab) // 128 * 128)


class CrossEntropyInputError(ValueError):
    """hidden/weight/labels that do not fit together; the message names them."""


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden (N, H) @ weight (V, H).T) against labels (N,) over the
    tokens whose label is not ignore_index; float32 scalar."""
    total, count = chunked_cross_entropy_sum(hidden, weight, labels, ignore_index, chunk_size)
    return total / count.clamp(min=1)


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses (float32 scalar, differentiable), number of non-ignored tokens (int64 scalar)).
    chunk_size: rows per chunk; default `default_chunk_rows(V)`, or TRAINED_WEIGHT_CHUNK when the weight
    gets a gradient."""
    if chunk_size is None:
        trained = torch.is_grad_enabled() and weight.requires_grad
        chunk_size = TRAINED_WEIGHT_CHUNK if trained else default_chunk_rows(weight.shape[0])
    _check_inputs(hidden, weight, labels, chunk_size)
    valid = labels != ignore_index
    # Checked on the device, without a host sync: a bad label stops the next kernel with this message.
    torch._assert_async(
        ((labels >= 0) & (labels < weight.shape[0]) | ~valid).all(),
        f"chunked_cross_entropy: a label is outside [0, {weight.shape[0]}) and is not ignore_index={ignore_index}",
    )
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = _ChunkedCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_size, want_grad)
    return total, valid.sum()


def cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The unfused definition: F.cross_entropy on the full float32 logits (mean over non-ignored)."""
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=ignore_index)


def _check_inputs(hidden, weight, labels, chunk_size) -> None:
    def bad(msg: str) -> CrossEntropyInputError:
        return CrossEntropyInputError(f"chunked_cross_entropy: {msg}")

    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise bad(f"expected hidden (N, H) and weight (V, H); got {tuple(hidden.shape)} and {tuple(weight.shape)} "
                  "(flatten batch and time into N first)")
    if labels.shape != hidden.shape[:1]:
        raise bad(f"labels has shape {tuple(labels.shape)}; expected ({hidden.shape[0]},), one per hidden row")
    if labels.dtype not in (torch.int64, torch.int32):
        raise bad(f"labels dtype is {labels.dtype}; expected an integer class index (int64)")
    if hidden.dtype != weight.dtype:
        raise bad(f"hidden is {hidden.dtype} and weight {weight.dtype}; cast them to one dtype")
    if chunk_size < 1:
        raise bad(f"chunk_size={chunk_size} must be >= 1")


def _logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h (C, H) @ w (V, H).T -> float32 (C, V): low-precision operands, float32 result."""
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(h, w.t(), out_dtype=torch.float32)
    return h.float() @ w.float().t()


def _accumulate_weight_grad(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc (V, H) float32 += g (C, V).T @ h (C, H), without a float32 copy of g."""
    if g.is_cuda and g.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(g.t().float(), h.float())


def _rows_loss_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, grad_dtype, want_grad: bool):
    """logits (C, V) float32 -> per-row loss (C,) float32 and d(sum loss)/d logits (C, V) or None."""
    if triton_usable(logits):
        from osstune.kernels import _cross_entropy_triton as kern

        c, v = logits.shape
        loss = torch.empty(c, device=logits.device, dtype=torch.float32)
        if not want_grad:
            grad = logits
        elif grad_dtype.itemsize <= logits.element_size():
            # In place (the kernel's docstring says why that is safe): the gradient's rows start where
            # the logits' rows do, with a row stride of the float32 row's bytes; a (C, V) view.
            grad = logits.view(grad_dtype)[:, :v]
        else:
            grad = torch.empty(c, v, device=logits.device, dtype=grad_dtype)
        kern._ce_rows[(c,)](logits, labels, loss, grad, v, logits.stride(0), grad.stride(0), ignore_index,
                            BLOCK_V=4096 if v >= 4096 else max(16, 1 << (v - 1).bit_length()),
                            WRITE_GRAD=want_grad, num_warps=8)
        return loss, (grad if want_grad else None)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    lse = logits.logsumexp(dim=-1)
    loss = torch.where(valid, lse - logits.gather(1, safe[:, None]).squeeze(1), 0.0)
    if not want_grad:
        return loss, None
    grad = torch.exp(logits - lse[:, None])
    grad.scatter_add_(1, safe[:, None], -torch.ones_like(grad[:, :1]))
    return loss, (grad * valid[:, None]).to(grad_dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, want_grad):
        n = hidden.shape[0]
        need_dh = want_grad and ctx.needs_input_grad[0]
        need_dw = want_grad and ctx.needs_input_grad[1]
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        d_hidden = torch.empty_like(hidden) if need_dh else None
        d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_dw else None
        for s in range(0, n, chunk_size):
            h = hidden[s : s + chunk_size]
            logits = _logits(h, weight)  # (C, V) float32
            loss, g = _rows_loss_grad(logits, labels[s : s + chunk_size], ignore_index, hidden.dtype, need_dh or need_dw)
            del logits  # g may be its storage (the Triton path writes the gradient in place)
            total += loss.sum()
            if need_dh:
                torch.mm(g, weight, out=d_hidden[s : s + chunk_size])
            if need_dw:
                _accumulate_weight_grad(d_weight, g, h)
            del g  # before the next chunk's logits are allocated, not after
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.has = (need_dh, need_dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        d_hidden, d_weight = ctx.saved_tensors
        need_dh, need_dw = ctx.has
        dh = (d_hidden.float() * grad_total).to(d_hidden.dtype) if need_dh else None
        dw = (d_weight * grad_total).to(ctx.weight_dtype) if need_dw else None
        return dh, dw, None, None, None, None
