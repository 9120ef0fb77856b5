"""One LoRA training step at the gpt-oss-20b shape: osstune's fast path against transformers + PEFT.

    PYTHONPATH=. python3 bench/train_throughput.py            # 2048 and 8192 tokens, both LoRA targets
    PYTHONPATH=. python3 bench/train_throughput.py --seq 2048 --targets all --impl ours --graph no --profile
    PYTHONPATH=. python3 bench/train_throughput.py --seq 2048 --targets all --impl ours --method lora qlora
    PYTHONPATH=. python3 bench/train_throughput.py --method qlora --impl ours --embedding cpu --optimizer cpu --attention-weights mxfp4
    PYTHONPATH=. python3 bench/train_throughput.py --method qlora --targets all --embedding cpu --optimizer cpu \
        --activations cpu --seq 65536 --longest 262144      # the longest sequence that fits

Random bf16 weights at the real shape (what LoRA trains after dequantizing MXFP4), LoRA r=8 alpha=16
on q/k/v/o ("attention") or also on the experts' gate_up/down ("all"), gradient checkpointing,
AdamW, one sequence per step. `--method qlora` (ours only): the experts stay packed MXFP4 as the
checkpoint ships them (`expert_format="mxfp4"`, random blocks and scales 118..124 drawn on the GPU),
trained through the MXFP4 grouped GEMMs with LoRA beside them.
`--embedding/--optimizer/--activations cpu` and `--attention-weights mxfp4` are the trainer's memory
options (docs/QLORA.md); peak memory is reported both allocated and reserved, and for ours also the
weights and what stays between steps. Every configuration runs in its own child process, so its peak
memory (torch.cuda.max_memory_allocated, model included) is its own. Each HF configuration takes
about 1-1.5 minutes (flex attention compiles on the first step), each of ours about 30 s.

- ours: the trainer's model preparation (osstune.train.prepare: LoRA, memory options, fast path), its
  load step a `GptOss` built on the meta device and initialised on the GPU (load_model's random
  preset draws every tensor on the host, ~11 s per expert tensor); the trainer's loss (`osstune.train.loss.cross_entropy_sum`: the chunked kernel on CUDA) and optimizer
  (`MasterAdamW`, float32 masters, clipping at 1.0). `--graph yes` (default): the micro-step is the
  trainer's `osstune.fast.GraphedStep`, fed host tensors; `--graph no`: eager. The row is packed as
  the trainer packs it (position_ids, one document in doc_ids).
- hf: transformers' GptOssForCausalLM + PEFT LoRA, configured as the reference baseline, with
  attention "flex_attention" and experts "grouped_mm" (PEFT target_parameters for the experts),
  gradient checkpointing (non-reentrant), torch AdamW.

MFU counts model FLOPs, no recomputation: 4 x (active matmul parameters per token) x tokens (forward
2x, input gradients 2x; the frozen base has no weight gradients; LoRA's are < 1% and left out) plus
attention, 3 x 4 x heads x head_dim x (query, key) pairs the masks allow (forward 2 matmuls,
backward 4), over the H100 SXM's dense bf16 peak of 989 TFLOP/s. Gradient checkpointing adds one
more forward (2x params, 1x attention) that MFU does not count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

PEAK_TFLOPS = 989.0
VOCAB_SAMPLE = 200_000  # token ids drawn below the special tokens, as the HF baseline does


# ------------------------------------------------------------------------------------ FLOPs


def attention_pairs(t: int, window: int | None) -> int:
    if window is None:
        return t * (t + 1) // 2
    w = min(window, t)
    return w * (w + 1) // 2 + (t - w) * w


def model_flops(cfg, t: int) -> float:
    """Model FLOPs of one LoRA step over t tokens, without recomputation (see the module docstring)."""
    h, i, q, kv, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_layer = h * (q * d + 2 * kv * d) + q * d * h + h * cfg.num_local_experts + cfg.num_experts_per_tok * 3 * h * i
    matmul_params = cfg.num_hidden_layers * per_layer + cfg.vocab_size * h  # + lm_head
    attn = sum(4 * q * d * attention_pairs(t, cfg.sliding_window if s else None) for s in cfg.is_sliding)
    return 4 * matmul_params * t + 3 * attn


# ---------------------------------------------------------------------------- our worker


def build_ours(preset: str, targets: str, policy: str, device: str, method: str = "lora", memory: dict | None = None):
    """The model as the trainer prepares it (osstune.train.prepare.PIPELINE), its `load` step replaced
    by random weights drawn on the device (seconds, where the checkpoint loader's host draws take
    minutes at gpt-oss-20b's size)."""
    import torch

    from osstune.checkpoint.random_init import random_model_on
    from osstune.config import PRESETS
    from osstune.lora import LoraConfig
    from osstune.train.config import MemoryConfig, TrainConfig
    from osstune.train.prepare import PIPELINE, Step, prepare_model

    cfg = PRESETS[preset]
    if method == "qlora":
        cfg = cfg.replace(expert_format="mxfp4")
    memory = memory or {}
    if memory.get("attention") == "mxfp4" and method != "qlora":
        raise ValueError("--attention-weights mxfp4 goes with --method qlora (as the trainer's attention_weights)")
    train_cfg = TrainConfig(
        model=preset,
        method=method,
        lora=LoraConfig(r=8, alpha=16, targets=targets),
        attention_weights=memory.get("attention", "bf16"),
        gradient_checkpointing=policy != "none",
        checkpoint_policy="layer" if policy == "none" else policy,
        memory=MemoryConfig(embedding=memory.get("embedding", "gpu"), activations=memory.get("activations", "gpu")),
    )

    def load_random(prep) -> None:
        prep.model = random_model_on(cfg, device)

    steps = (Step("load", load_random), *PIPELINE[1:])
    torch.manual_seed(0)  # the adapters' factors
    model = prepare_model(train_cfg, torch.device(device), torch.bfloat16, fast=device == "cuda", steps=steps)
    return model.train(), cfg


def run_ours(spec: dict) -> dict:
    import torch

    from osstune.train.config import OptimConfig
    from osstune.train.loss import IGNORE, cross_entropy_sum
    from osstune.train.optim import MasterAdamW

    device = spec.get("device", "cuda")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    memory = spec.get("memory") or {}
    model, cfg = build_ours(spec["preset"], spec["targets"], spec["checkpoint"], device, spec.get("method", "lora"), memory)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    init_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    if device == "cuda":  # the peak of the training steps, as the trainer reports it (not of the set-up)
        torch.cuda.empty_cache()  # as the trainer does before its first step
        torch.cuda.reset_peak_memory_stats()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = MasterAdamW(trainable, OptimConfig(lr=1e-4, moments=memory.get("moments", "float32")),
                      offload=memory.get("optimizer") == "cpu")
    seq = spec["seq"]
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, min(VOCAB_SAMPLE, cfg.vocab_size), (1, seq + 1), device=device, generator=gen)
    inputs, labels = ids[:, :-1], ids[:, 1:].clone()
    labels[:, -1] = IGNORE  # the HF baseline's loss also covers seq - 1 tokens
    positions = torch.arange(seq, device=device)[None]
    doc_ids = torch.zeros(1, seq, dtype=torch.long, device=device)
    n_trained = seq - 1

    def forward_backward() -> torch.Tensor:
        hidden = model(inputs, position_ids=positions, doc_ids=doc_ids, return_hidden=True)
        loss = cross_entropy_sum(hidden.flatten(0, 1), model.lm_head.weight, labels.flatten()) / n_trained
        loss.backward()
        return loss.detach()

    def step() -> tuple[torch.Tensor, float]:
        loss = forward_backward()
        host = time.perf_counter()  # forward + backward enqueued; near the step time = host-bound
        opt.step(1e-4)  # reads the gradient norm: the step's one sync
        return loss, host

    warmup = spec["warmup"]
    # The trainer's graphed micro-step, fed host tensors as the trainer does; layer inputs in host
    # memory keep the step eager (a graph cannot record host copies), as in the trainer.
    spec = dict(spec, graph=bool(spec.get("graph")) and memory.get("activations") != "cpu")
    if spec["graph"]:
        from osstune.fast import GraphedStep

        graphed = GraphedStep(model, cross_entropy_sum)
        warmup += graphed.warmup  # its eager warm-up calls and the capture stay out of the timings
        host_batch = [t.cpu() for t in (inputs, positions, doc_ids, labels)]

        def step() -> tuple[torch.Tensor, float]:
            loss_sum = graphed(*host_batch, n_trained)
            host = time.perf_counter()
            if not math.isfinite(loss_sum.item()):  # the trainer's check
                raise RuntimeError("loss is not finite")
            opt.step(1e-4)
            return loss_sum / n_trained, host

    times, hosts = [], []
    for _ in range(warmup + spec["steps"]):
        sync()
        t = time.perf_counter()
        loss, host = step()
        sync()
        times.append(time.perf_counter() - t)
        hosts.append(host - t)
    result = _summary(dict(spec, warmup=warmup), cfg, times, init_s, loss, device)
    result["host_enqueue_s"] = round(sorted(hosts[warmup:])[spec["steps"] // 2], 3)
    if device == "cuda":  # where the peak goes: weights, then what stays between steps (LoRA, grads, optimizer)
        result["weights_gib"] = round(weights_gib, 2)
        result["between_steps_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    if spec.get("profile"):
        result["profile"] = _profile(step, spec["out"], spec["name"])
    return result


def _profile(step, out: str, name: str) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    path = Path(out) / f"profile_{name}.txt"
    path.write_text(table)
    kernels = []
    for e in events:
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((us, e.count, e.key))
    kernels.sort(reverse=True)
    total = sum(us for us, _, _ in kernels)
    lines = [f"device time of one step: {total / 1e3:.1f} ms in kernels"]
    lines += [f"  {us / 1e3:8.2f} ms {100 * us / total:5.1f}%  x{n:<5d} {key[:90]}" for us, n, key in kernels[:15]]
    summary = "\n".join(lines)
    (Path(out) / f"profile_{name}_kernels.txt").write_text(summary + "\n")
    return summary


def _summary(spec: dict, cfg, times: list[float], init_s: float, loss, device: str) -> dict:
    import torch

    measured = times[spec["warmup"]:]
    med = sorted(measured)[len(measured) // 2]
    tokens = spec["seq"]
    r = dict(name=spec["name"], impl=spec["impl"], method=spec.get("method", "lora"), seq=tokens, targets=spec["targets"], checkpoint=spec["checkpoint"],
             memory=spec.get("memory") or {},
             graph=bool(spec.get("graph")),
             step_s=round(med, 4), tok_s=round(tokens / med), first_step_s=round(times[0], 1), init_s=round(init_s, 1),
             steps=[round(t, 4) for t in measured], loss=round(float(loss), 4))
    r["mfu"] = round(model_flops(cfg, tokens) / med / (PEAK_TFLOPS * 1e12), 4)
    if device == "cuda":
        r["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        r["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return r


# ----------------------------------------------------------------------------- HF worker


def run_hf(spec: dict) -> dict:
    """transformers + PEFT as the reference baseline sets them up: flex attention, grouped_mm experts,
    LoRA via PEFT (experts through target_parameters), non-reentrant checkpointing, AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    from osstune.config import PRESETS

    attn, experts = "flex_attention", "grouped_mm"
    hc = GptOssConfig(num_hidden_layers=24, num_local_experts=32, vocab_size=201088, hidden_size=2880,
                      intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8,
                      sliding_window=128, max_position_embeddings=131072, attn_implementation=attn)
    hc._experts_implementation = experts
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = GptOssForCausalLM(hc)
        torch.set_default_dtype(torch.float32)
    model.config._experts_implementation = experts
    init_s = time.perf_counter() - t0
    lcfg = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    if spec["targets"] == "all":
        lcfg["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = get_peft_model(model, LoraConfig(**lcfg))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, VOCAB_SAMPLE, (1, spec["seq"]), device="cuda", generator=gen)
    times = []
    for _ in range(spec["warmup"] + spec["steps"]):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return _summary(spec, PRESETS["gpt-oss-20b"], times, init_s, out.loss.detach(), "cuda")


# ------------------------------------------------------------------------------- driver


def worker(spec: dict) -> None:
    try:
        result = run_ours(spec) if spec["impl"] == "ours" else run_hf(spec)
    except Exception as e:  # reported in the table, the other configurations still run
        import traceback

        traceback.print_exc()
        result = dict(name=spec["name"], impl=spec["impl"], method=spec.get("method", "lora"), seq=spec["seq"], targets=spec["targets"],
                      checkpoint=spec["checkpoint"], error=f"{type(e).__name__}: {str(e)[:300]}")
    print("RESULT " + json.dumps(result), flush=True)


def launch(spec: dict, out: Path, timeout: float) -> dict:
    log = out / f"{spec['name']}.log"
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if spec["impl"] == "ours":  # the allocator setting `osstune train` starts with
        from osstune.cli import CUDA_ALLOC_CONF

        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env=env)
        text = proc.stdout
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += f"\nRESULT {json.dumps(dict(spec, error=f'timed out after {timeout:.0f} s'))}"
    log.write_text(text)
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return dict(spec, error=f"no result (exit code {proc.returncode}); see {log}")
    return json.loads(lines[-1][len("RESULT "):])


def longest(spec: dict, start: int, limit: int, out: Path, timeout: float) -> dict:
    """Double the sequence from `start` while one step fits, then bisect to a multiple of 4,096.
    A trial fails on CUDA out-of-memory; any other error stops the search."""
    step = 4096
    fits, fails, trials = None, None, []

    def trial(seq: int) -> bool:
        r = launch(dict(spec, name=f"longest_{seq}", seq=seq), out, timeout)
        trials.append({k: r.get(k) for k in ("seq", "step_s", "tok_s", "peak_alloc_gib", "peak_reserved_gib", "error")})
        print(json.dumps(trials[-1]), flush=True)
        if "error" in r and "OutOfMemory" not in r["error"] and "out of memory" not in r["error"]:
            raise SystemExit(f"seq {seq}: {r['error']}")
        return "error" not in r

    seq = start
    while seq <= limit:
        if not trial(seq):
            fails = seq
            break
        fits, seq = seq, seq * 2
    if fits is not None and fails is not None:
        while fails - fits > step:
            mid = (fits + fails) // 2 // step * step
            if trial(mid):
                fits = mid
            else:
                fails = mid
    return dict(longest_fitting=fits, first_failing=fails, limit=limit, method=spec["method"], targets=spec["targets"],
                memory=spec["memory"], trials=trials)


def _variant(r: dict) -> str:
    method = "qlora " if r.get("method") == "qlora" else ""
    mem = r.get("memory") or {}
    moved = [k for k in ("embedding", "optimizer", "activations") if mem.get(k) == "cpu"]
    extra = (" cpu:" + ",".join(moved) if moved else "") + (" attn-mxfp4" if mem.get("attention") == "mxfp4" else "")
    return method + r["checkpoint"] + ("+graph" if r.get("graph") else "") + extra


def table(rows: list[dict]) -> str:
    head = f"{'impl':5s} {'seq':>5s} {'LoRA':9s} {'ckpt':23s} {'step s':>7s} {'tok/s':>7s} {'peak GiB':>8s} {'rsvd GiB':>8s} {'MFU':>6s} {'vs HF':>6s} {'mem/HF':>6s}"
    lines = [head]
    hf = {(r["seq"], r["targets"]): r for r in rows if r["impl"] == "hf" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['impl']:5s} {r['seq']:5d} {r['targets']:9s} {_variant(r):23s} ERROR {r['error'][:80]}")
            continue
        base = hf.get((r["seq"], r["targets"]))
        ratio = f"{r['tok_s'] / base['tok_s']:6.2f}" if base and r["impl"] != "hf" else "     -"
        mem = f"{r['peak_alloc_gib'] / base['peak_alloc_gib']:6.2f}" if base and r["impl"] != "hf" else "     -"
        lines.append(f"{r['impl']:5s} {r['seq']:5d} {r['targets']:9s} {_variant(r):23s} {r['step_s']:7.3f} "
                     f"{r['tok_s']:7d} {r.get('peak_alloc_gib', float('nan')):8.2f} {r.get('peak_reserved_gib', float('nan')):8.2f} "
                     f"{100 * r['mfu']:5.1f}% {ratio} {mem}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--targets", nargs="+", default=["attention", "all"], choices=["attention", "all"])
    ap.add_argument("--impl", nargs="+", default=["ours", "hf"], choices=["ours", "hf"])
    ap.add_argument("--checkpoint", nargs="+", default=["layer"], choices=["layer", "keep_expert_gemms", "none"],
                    help="our gradient-checkpointing policies to run (none: no checkpointing)")
    ap.add_argument("--graph", nargs="+", default=["yes"], choices=["no", "yes"],
                    help="our micro-step recorded as a CUDA graph (osstune.fast.GraphedStep, what the trainer "
                         "runs on a GPU) and/or eager")
    ap.add_argument("--method", nargs="+", default=["lora"], choices=["lora", "qlora"],
                    help="lora: bf16 experts; qlora: experts kept packed MXFP4 (ours only)")
    ap.add_argument("--embedding", choices=["gpu", "cpu"], default="gpu", help="memory.embedding (ours)")
    ap.add_argument("--optimizer", choices=["gpu", "cpu"], default="gpu", help="memory.optimizer (ours)")
    ap.add_argument("--activations", choices=["gpu", "cpu"], default="gpu",
                    help="memory.activations (ours; the step then runs eagerly)")
    ap.add_argument("--moments", choices=["float32", "int8"], default="float32",
                    help="optim.moments (ours): AdamW's moments in float32 or block-wise 8 bits")
    ap.add_argument("--attention-weights", choices=["bf16", "mxfp4"], default="bf16",
                    help="qlora only: frozen attention projections stored as MXFP4 (lossy, opt-in)")
    ap.add_argument("--longest", type=int, metavar="MAX_TOKENS",
                    help="instead of timing: the longest sequence (multiple of 4,096, up to MAX_TOKENS) for which one "
                         "step of our first configuration fits, by doubling from --seq and then bisecting")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="profile one step of our first configuration")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--preset", default="gpt-oss-20b", help=argparse.SUPPRESS)  # tiny: a CPU smoke test
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    memory = dict(embedding=args.embedding, optimizer=args.optimizer, activations=args.activations,
                  attention=args.attention_weights, moments=args.moments)
    if args.longest:
        spec = dict(impl="ours", method=args.method[0], targets=args.targets[0], checkpoint=args.checkpoint[0],
                    graph=False, steps=1, warmup=0, preset=args.preset, device=args.device, out=str(out), memory=memory)
        print(json.dumps(longest(spec, args.seq[0], args.longest, out, args.timeout)), flush=True)
        return
    rows, profiled = [], False
    for seq in args.seq:
        for targets in args.targets:
            runs = [(impl, m) for impl in args.impl for m in args.method if impl == "ours" or m == "lora"]
            for impl, method in runs:
                variants = [(p, g == "yes") for p in args.checkpoint for g in args.graph] if impl == "ours" else [("hf", False)]
                for policy, graph in variants:
                    name = f"{impl}_{seq}_{targets}_{policy}" + ("_graph" if graph else "") + ("_qlora" if method == "qlora" else "")
                    spec = dict(name=name, impl=impl, method=method, seq=seq, targets=targets, checkpoint=policy, graph=graph,
                                steps=args.steps, warmup=args.warmup, preset=args.preset, device=args.device,
                                out=str(out), profile=args.profile and impl == "ours" and not graph and not profiled,
                                memory=memory if impl == "ours" else {})
                    profiled |= spec["profile"]
                    r = launch(spec, out, args.timeout)
                    rows.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
                    if r.get("profile"):
                        print(r["profile"], flush=True)
    with open(out / "train_throughput.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
