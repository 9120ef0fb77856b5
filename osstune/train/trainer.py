"""The training loop: LoRA, QLoRA or full fine-tuning of a GPT-OSS model on packed chat data.

One optimizer step = `grad_accum` micro-batches of `micro_batch` packed sequences each. The loss
is the mean over every trained token of the step (not a mean of per-micro-batch means), so
accumulation gives the same gradient as one large batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from osstune import parallel
from osstune.device import pick_device
from osstune.errors import Interrupted, OsstuneError
from osstune.fast import graphed_step, use_fast_path
from osstune.offload import HostEmbedding
from osstune.train import sharded
from osstune.train import state as ckpt
from osstune.train.batches import Batch, build_data
from osstune.train.config import RESUMABLE_CHANGES, TrainConfig
from osstune.interrupt import StopRequest
from osstune.train.loss import cross_entropy_sum
from osstune.train.prepare import prepare_model, stored_expert_format
from osstune.train.optim import MasterAdamW, lr_at
from osstune.train.plot import plot_loss
from osstune.train.progress import MetricsLog, Progress
from osstune.train.recipe import to_dict
from osstune.train.report import Reporter, check_reporters


class TrainError(OsstuneError, RuntimeError):
    pass


@dataclass
class TrainResult:
    output: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    artifact: Path
    losses: list[float] = field(default_factory=list)


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    device = pick_device(cfg.device, option="device")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def _check_resume(cfg: TrainConfig, saved: dict) -> None:
    """Refuse to resume with options that change what is computed. A field the checkpoint's config
    lacks (a run saved before the field existed) counts as its default, which that run used."""
    now, defaults = to_dict(cfg), to_dict(TrainConfig())
    diffs = []

    def walk(a: dict, b: dict, d: dict, prefix: str) -> None:
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}{key}"
            old = b.get(key, d.get(key))
            if isinstance(a.get(key), dict) and isinstance(old, dict):
                walk(a[key], old, d.get(key) or {}, name + ".")
            elif a.get(key) != old and name not in RESUMABLE_CHANGES:
                diffs.append(f"{name}: checkpoint {old!r}, now {a.get(key)!r}")

    walk(now, saved, defaults, "")
    if diffs:
        raise ckpt.ResumeError(
            "cannot resume: the run in the output directory used a different config:\n  "
            + "\n  ".join(diffs)
            + "\nUse the same options, or a new --output to start a separate run."
        )


def _check_method(cfg: TrainConfig) -> None:
    if cfg.method == "qlora" and stored_expert_format(cfg.model) != "mxfp4":
        raise ValueError(
            f"method 'qlora' trains LoRA on frozen MXFP4 experts, but {cfg.model} stores bf16 experts; "
            "use method 'lora' for it, or an MXFP4 checkpoint (osstune create --mxfp4)"
        )


def _batch_loss(model: torch.nn.Module, batch: Batch, device: torch.device, kernel: bool | None = None) -> torch.Tensor:
    # A host-memory embedding takes the ids where they are (sending them over and back would sync).
    on_host = isinstance(model.model.embed_tokens, HostEmbedding)
    hidden = model(
        batch.input_ids if on_host else batch.input_ids.to(device),
        position_ids=batch.position_ids.to(device),
        doc_ids=batch.doc_ids.to(device),
        return_hidden=True,
    )
    labels = batch.labels.to(device)
    return cross_entropy_sum(hidden.flatten(0, 1), model.lm_head.weight, labels.flatten(), kernel=kernel)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: list[Batch], device: torch.device, kernel: bool | None = None
) -> float | None:
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += float(_batch_loss(model, batch, device, kernel))
        count += batch.num_trained
    model.train(was_training)
    return total / max(count, 1)


def train(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, stop_after: int | None = None) -> TrainResult:
    """Run (or with `resume`, continue) training. `stop_after` ends this invocation after that many
    steps with a checkpoint, e.g. for time-boxed jobs; `--resume` continues exactly from there."""
    device, dtype = resolve_device(cfg)
    # One process unless torchrun started this one; then each rank holds its share (osstune/parallel).
    world = parallel.init_world(cfg.parallel, device)
    try:
        return _train(cfg, world, dtype, resume=resume, quiet=quiet, stop_after=stop_after)
    finally:
        parallel.close_world(world)


def _train(
    cfg: TrainConfig, world: parallel.World, dtype: torch.dtype, *, resume: bool, quiet: bool, stop_after: int | None
) -> TrainResult:
    out = Path(cfg.output)
    ckpt_root = out / "checkpoints"
    device = world.device
    quiet = quiet or not world.is_main  # logs, metrics and artifacts come from the main rank only
    sharded.check_options(cfg, world)
    # The one decision of the run between osstune's kernels and the reference (model, loss, graphs).
    fast = use_fast_path(cfg.fast, device)

    # Everything that can fail on the user's input fails here, before any model is loaded.
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file; --output names the run's directory")
    exists = ckpt.has_checkpoint(ckpt_root)
    if resume and not exists:
        raise ckpt.ResumeError(f"--resume: no checkpoint in {ckpt_root}; start without --resume")
    if not resume and exists:
        raise ckpt.ResumeError(
            f"{out} already holds a run (checkpoints in {ckpt_root}); pass --resume to continue it "
            "or choose another --output"
        )
    saved, previous = None, None
    if resume and world.distributed:
        previous = ckpt.latest_checkpoint(ckpt_root)
        saved = previous
        _check_resume(cfg, sharded.saved_config(previous, world))
    elif resume:
        try:
            sharded.refuse_sharded(ckpt.latest_checkpoint(ckpt_root))
        except ckpt.ResumeError:
            pass  # `latest` names a missing checkpoint: load_latest falls back, saying so
        previous, saved = ckpt.load_latest(ckpt_root)
        _check_resume(cfg, saved[0].config)
    _check_method(cfg)
    check_reporters(cfg.report_to)
    data = build_data(cfg)

    torch.manual_seed(cfg.seed)
    notes: list[str] = []
    # The model as it trains, sharded over the world's processes (osstune/train/prepare.py).
    model = prepare_model(cfg, device, dtype, notes, fast=fast, world=world)
    if world.distributed:
        # Every data rank its own dropout masks; the tp ranks of a group share theirs (same activations).
        torch.manual_seed(cfg.seed + 1 + world.dp_rank)
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    norm = parallel.grad_norm_fn(model, world) if world.distributed else None
    opt = MasterAdamW(trainable, cfg.optim, offload=cfg.memory.optimizer == "cpu", grad_norm=norm)
    # Forward + loss + backward as one CUDA graph replay (osstune/fast/graphs.py); None: eager.
    # One process only: FSDP's hooks and collectives are not recorded into the graph.
    graphed = None
    if fast and not world.distributed:
        graphed = graphed_step(model, cross_entropy_sum)
    comm = parallel.CommMeter(cfg.parallel.comm_every if world.distributed else 0, device)

    start_step, tokens_seen = 0, 0
    if saved is not None and world.distributed:
        start_step, tokens_seen = sharded.resume(saved, trainable, opt, data, world)
    elif saved is not None:
        state, weights, opt_state = saved
        missing = [n for n, _ in trainable if n not in weights]
        if missing:
            raise ckpt.ResumeError(f"checkpoint {previous} lacks trainable tensor {missing[0]!r}; it belongs to another run")
        params = dict(trainable)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
        opt.load_state_tensors(opt_state)
        data.train.load_state_dict(state.data_state)
        start_step, tokens_seen = state.step, state.tokens_seen
        torch.set_rng_state(state.rng_cpu)
        if device.type == "cuda" and state.rng_cuda:
            torch.cuda.set_rng_state_all(state.rng_cuda)

    out.mkdir(parents=True, exist_ok=True)
    report = Reporter(cfg.report_to, out, to_dict(cfg), start_step)  # reports from rank 0 only
    metrics = MetricsLog(out / "metrics.jsonl", resume_from_step=start_step) if world.is_main else None
    progress = Progress(cfg.steps, start_step=start_step, quiet=quiet)
    if not quiet:
        n_train = sum(p.numel() for _, p in trainable)
        progress.message(
            f"osstune: {cfg.method} on {cfg.model} ({device.type}, {str(dtype).removeprefix('torch.')}), "
            f"{n_train:,} trainable parameters; {data.summary}"
            + (f"; {world.describe()}" if world.distributed else "")
        )
        for note in notes:
            progress.message(f"osstune: {note}")
    if device.type == "cuda":
        # Blocks the set-up freed (loading, quantize_attention, building the optimizer) go back to
        # the device: the run's footprint then starts at what its tensors hold, not at the set-up's peak.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    losses: list[float] = []
    eval_loss = None
    last_saved = previous
    t_last = t_saved = time.perf_counter()
    tokens_since = step_tokens = 0
    # SIGINT/SIGTERM: the step finishes, is saved, and the run ends with how to resume (interrupt.py).
    stop = StopRequest().install()
    try:
        end = cfg.steps if stop_after is None else min(cfg.steps, start_step + stop_after)
        for step in range(start_step, end):
            comm.start(step)
            # The global batch: this rank computes its share, n_trained counts the whole batch.
            micro = [data.train.next_batch() for _ in range(cfg.grad_accum * world.dp_size)]
            n_trained = sum(b.num_trained for b in micro)
            step_tokens = sum(b.num_tokens for b in micro)
            step_loss = 0.0
            for batch in parallel.share(micro, world):
                if graphed is not None:  # also runs the backward
                    loss_sum = graphed(batch.input_ids, batch.position_ids, batch.doc_ids, batch.labels, n_trained)
                else:
                    loss_sum = _batch_loss(model, batch, device, kernel=fast)
                if not math.isfinite(loss_sum.item()):
                    kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written yet"
                    raise TrainError(
                        f"loss became {loss_sum.item()} at step {step + 1}; training stopped and nothing was saved "
                        f"from this step ({kept}). Lower optim.lr, raise optim.warmup_steps, or check the data."
                    )
                if graphed is None:
                    (loss_sum / n_trained).backward()
                step_loss += loss_sum.item()
            lr = lr_at(step, cfg.steps, cfg.optim)
            grad_norm = opt.step(lr)
            step_loss = parallel.all_sum(world, step_loss)
            comm.stop()
            if not math.isfinite(grad_norm):
                raise TrainError(f"gradient norm became {grad_norm} at step {step + 1}; lower optim.lr or check the data")
            loss = step_loss / n_trained
            losses.append(loss)
            tokens_seen += step_tokens
            tokens_since += step_tokens
            done = step + 1

            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen}
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                eval_loss = evaluate(model, data.eval, device, kernel=fast)
                record["eval_loss"] = eval_loss
            # The first step is always logged, so the loss curve starts where training started.
            if done % cfg.log_every == 0 or done in (start_step + 1, cfg.steps) or "eval_loss" in record:
                now = time.perf_counter()
                record["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                if device.type == "cuda":
                    record["peak_gpu_gb"] = parallel.all_max(world, torch.cuda.max_memory_allocated(device) / 2**30)
                if comm.last is not None:
                    record["comm_s"] = comm.take()
                if metrics is not None:
                    metrics.write(record)
                report.log(done, record)
                progress.update(done, record)
            # Saved by steps, by time (a long run never risks more than save_minutes of work), on a
            # stop signal, and at the end of this invocation.
            due_by_time = cfg.save_minutes > 0 and time.perf_counter() - t_saved >= cfg.save_minutes * 60
            # Ranks save together (the save is collective): any rank's clock or signal decides for all.
            signalled = int(parallel.all_max(world, float(stop.signal_number or 0)))
            due_by_time = bool(parallel.all_max(world, float(due_by_time)))
            if (cfg.save_every and done % cfg.save_every == 0) or due_by_time or signalled or done == end:
                if world.distributed:
                    last_saved = sharded.save(cfg, ckpt_root, done, tokens_seen, model, trainable, opt, data, world)
                else:
                    last_saved = _save(cfg, ckpt_root, done, tokens_seen, model, trainable, opt, data)
                t_saved = time.perf_counter()
            if signalled and done < end:
                raise Interrupted(
                    f"stopped at step {done}/{cfg.steps}; checkpoint saved in {last_saved}. Continue with "
                    f"the same `osstune train` command plus --resume (or train(cfg, resume=True)); output {out}.",
                    signalled,
                )
    except torch.OutOfMemoryError as e:
        raise TrainError(_oom_message(e, cfg, device, step_tokens)) from None
    finally:
        stop.restore()
        if metrics is not None:
            metrics.close()
        report.close()

    if world.distributed:
        artifact = sharded.export(cfg, model, trainable, world, dtype, lambda m: _export(cfg, m, out))
    if not world.is_main:
        return TrainResult(out, cfg.steps, losses[-1] if losses else float("nan"), eval_loss, artifact, losses)
    history = metrics.read()
    plot_loss(
        out / "loss.png",
        [(r["step"], r["loss"]) for r in history],
        [(r["step"], r["eval_loss"]) for r in history if r.get("eval_loss") is not None],
    )
    if not world.distributed:
        artifact = _export(cfg, model, out)
    final = history[-1]["loss"] if history else float("nan")
    if not quiet:
        progress.message(f"osstune: done. {'adapter' if cfg.method != 'full' else 'model'} written to {artifact}")
    return TrainResult(out, cfg.steps, final, eval_loss, artifact, losses)


def _oom_message(error: Exception, cfg: TrainConfig, device: torch.device, step_tokens: int) -> str:
    """The allocator's own account (what was asked, what is held, by whom) and then what to change."""
    tokens = step_tokens // cfg.grad_accum or cfg.micro_batch * cfg.data.seq_len
    held = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        held = (
            f" At the failure this run held {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB in tensors "
            f"(peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB) of the GPU's {total:.1f} GiB."
        )
    return (
        f"the GPU ran out of memory with {tokens:,} tokens per micro-batch "
        f"(micro_batch={cfg.micro_batch} x data.seq_len={cfg.data.seq_len}).{held} "
        "Activation memory grows with the tokens per micro-batch: halve data.seq_len or micro_batch (raise "
        "grad_accum to keep the batch), keep gradient_checkpointing on, set memory.activations=cpu or "
        "memory.optimizer=cpu, or use --method qlora to keep the experts in MXFP4.\n"
        f"The allocator said: {error}"
    )


def _save(cfg, root, step, tokens_seen, model, trainable, opt, data) -> Path:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    state = ckpt.TrainState(
        step=step,
        tokens_seen=tokens_seen,
        data_state=data.train.state_dict(),
        config=to_dict(cfg),
        rng_cpu=torch.get_rng_state(),
        rng_cuda=cuda,
    )
    weights = {n: p for n, p in trainable}
    return ckpt.save_checkpoint(root, state, weights, opt.state_tensors(), keep=cfg.keep_checkpoints)


def _export(cfg: TrainConfig, model: torch.nn.Module, out: Path) -> Path:
    if cfg.method == "full":
        from osstune.checkpoint import resolve_checkpoint, save_model

        from osstune.config import PRESETS

        # A preset has no tokenizer files to carry over (and no repo to ask for them).
        source = None if cfg.model in PRESETS else resolve_checkpoint(cfg.model)
        save_model(model, out / "model", tokenizer_source=source)
        return out / "model"
    from osstune.lora import save_adapter

    save_adapter(model, out / "adapter", base_model=cfg.model)
    return out / "adapter"
