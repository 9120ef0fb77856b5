"""The planner against the GPU: predicted vs measured peak memory and tokens/s over a grid of
configurations, and whether the recommended configuration for a memory budget fits and is near the
fastest measured one that fits.

    PYTHONPATH=. python3 bench/plan_accuracy.py                      # the default grid (20b; ~25 min)
    PYTHONPATH=. python3 bench/plan_accuracy.py --grid quick         # 6 configurations (~5 min)
    PYTHONPATH=. python3 bench/plan_accuracy.py --grid 120b          # gpt-oss-120b QLoRA rows
    PYTHONPATH=. python3 bench/plan_accuracy.py --budgets 16 24 40 80   # + the recommendation check

Each configuration runs in its own process through bench/train_throughput.py's worker (random
weights at the real shape, the trainer's fast path, graphed step, MasterAdamW; one sequence a step,
LoRA r=8 alpha=16), so its peak (`torch.cuda.max_memory_allocated` over the training steps, what
the trainer reports) is its own. Targets (docs/PLANNING.md): every predicted peak within 10% of the
measured one; for each budget, the recommended configuration's measured reserved memory fits it
and its speed is within 15% of the fastest measured configuration that fits.
Results are appended to OUT/plan_accuracy.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import launch  # noqa: E402  (the same worker as the throughput tables)

from osstune.lora import LoraConfig  # noqa: E402
from osstune.plan.hardware import GPUs, peak_for  # noqa: E402
from osstune.plan.memory import model_config  # noqa: E402
from osstune.plan.search import make_plan, predict  # noqa: E402
from osstune.train.config import DataConfig, MemoryConfig, OptimConfig, TrainConfig  # noqa: E402

GIB = 2**30
MODELS = {"gpt-oss-20b": "openai/gpt-oss-20b", "gpt-oss-120b": "openai/gpt-oss-120b"}


def config(preset: str, method: str, targets: str, seq: int, policy: str = "layer", embedding: str = "gpu",
           optimizer: str = "gpu", activations: str = "gpu", moments: str = "float32",
           attention: str = "bf16") -> TrainConfig:  # fmt: skip
    return TrainConfig(
        model=MODELS[preset], method=method, lora=LoraConfig(r=8, alpha=16, targets=targets),
        data=DataConfig(seq_len=seq), optim=OptimConfig(moments=moments), attention_weights=attention,
        gradient_checkpointing=policy != "none", checkpoint_policy="layer" if policy == "none" else policy,
        memory=MemoryConfig(embedding=embedding, optimizer=optimizer, activations=activations),
    )  # fmt: skip


def grid(name: str) -> list[TrainConfig]:
    c = config
    quick = [
        c("gpt-oss-20b", "qlora", "all", 2048),
        c("gpt-oss-20b", "qlora", "all", 2048, embedding="cpu", moments="int8", attention="mxfp4"),
        c("gpt-oss-20b", "qlora", "attention", 8192, policy="keep_expert_gemms"),
        c("gpt-oss-20b", "lora", "all", 2048),
        c("gpt-oss-20b", "qlora", "all", 16384, embedding="cpu", optimizer="cpu", activations="cpu"),
        c("gpt-oss-20b", "qlora", "all", 2048, policy="none"),
    ]
    if name == "quick":
        return quick
    if name == "120b":
        return [
            c("gpt-oss-120b", "qlora", "attention", 4096, embedding="cpu"),
            c("gpt-oss-120b", "qlora", "all", 4096, embedding="cpu", optimizer="cpu"),
            c("gpt-oss-120b", "qlora", "all", 2048, embedding="cpu", moments="int8"),
            c("gpt-oss-120b", "qlora", "attention", 8192, embedding="cpu"),
        ]
    rows = list(quick)
    for method in ("lora", "qlora"):
        for targets in ("attention", "all"):
            for seq in (2048, 8192):
                for policy in ("layer", "keep_expert_gemms"):
                    rows.append(c("gpt-oss-20b", method, targets, seq, policy=policy, embedding="cpu"))
    rows += [
        c("gpt-oss-20b", "qlora", "all", 4096, optimizer="cpu"),
        c("gpt-oss-20b", "qlora", "attention", 2048, moments="int8", attention="mxfp4", embedding="cpu"),
        c("gpt-oss-20b", "qlora", "all", 32768, activations="cpu", embedding="cpu"),
    ]
    seen, out = set(), []
    for r in rows:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def spec(cfg: TrainConfig, out: Path, steps: int) -> dict:
    preset = next(p for p, m in MODELS.items() if m == cfg.model)
    policy = cfg.checkpoint_policy if cfg.gradient_checkpointing else "none"
    name = (f"plan_{preset}_{cfg.method}_{cfg.lora.targets}_{cfg.data.seq_len}_{policy}_{cfg.memory.embedding}"
            f"{cfg.memory.optimizer}{cfg.memory.activations}_{cfg.optim.moments}_{cfg.attention_weights}")  # fmt: skip
    memory = dict(embedding=cfg.memory.embedding, optimizer=cfg.memory.optimizer, activations=cfg.memory.activations,
                  attention=cfg.attention_weights, moments=cfg.optim.moments)  # fmt: skip
    return dict(name=name, impl="ours", method=cfg.method, seq=cfg.data.seq_len, targets=cfg.lora.targets,
                checkpoint=policy, graph=True, steps=steps, warmup=2, preset=preset, device="cuda", out=str(out),
                profile=False, memory=memory)  # fmt: skip


def describe(cfg: TrainConfig) -> str:
    from osstune.plan.cli import describe as plan_describe

    return f"{cfg.model.split('-')[-1]} {cfg.lora.targets} {cfg.data.seq_len} " + plan_describe(cfg)


def measure(cfg: TrainConfig, gpus: GPUs, out: Path, steps: int, timeout: float, dry_run: bool) -> dict:
    c = predict(cfg, model_config(cfg.model), gpus)
    row = dict(config=describe(cfg), predicted_alloc_gib=round(c.memory.allocated / GIB, 2),
               predicted_needed_gib=round(c.memory.needed / GIB, 2), predicted_tok_s=round(c.speed.tokens_per_s),
               gpu=gpus.name)  # fmt: skip
    if dry_run:
        print(f"{row['config']:62s} {row['predicted_alloc_gib']:8.2f} {'':8s} {'':6s} {row['predicted_needed_gib']:6.2f} "
              f"{'':6s} {row['predicted_tok_s']:10,d}", flush=True)  # fmt: skip
        return dict(row, error="dry run")
    r = launch(spec(cfg, out, steps), out, timeout)
    if "error" in r:
        print(f"{row['config']:62s} {row['predicted_alloc_gib']:8.2f}  ERROR {r['error'][:80]}", flush=True)
        return dict(row, error=r["error"])
    row.update(measured_alloc_gib=r["peak_alloc_gib"], measured_reserved_gib=r["peak_reserved_gib"],
               measured_tok_s=r["tok_s"])  # fmt: skip
    mem_err = row["predicted_alloc_gib"] / r["peak_alloc_gib"] - 1
    tok_err = row["predicted_tok_s"] / r["tok_s"] - 1
    row.update(memory_error=round(mem_err, 4), speed_error=round(tok_err, 4))
    print(f"{row['config']:62s} {row['predicted_alloc_gib']:8.2f} {r['peak_alloc_gib']:8.2f} {mem_err:+6.1%} "
          f"{row['predicted_needed_gib']:6.2f} {r['peak_reserved_gib']:6.2f} {row['predicted_tok_s']:10,d} "
          f"{r['tok_s']:10,d} {tok_err:+6.1%}", flush=True)  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=("quick", "default", "120b", "none"), default="default")
    ap.add_argument("--budgets", type=float, nargs="*", default=[], metavar="GIB",
                    help="GPU memory budgets (GiB): run the plan's recommendation for each (method, targets, sequence) "
                         "of the grid and compare it with the grid's measured rows that fit the budget")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--dry-run", action="store_true", help="predictions only, for an 80 GB H100 (no GPU needed)")
    ap.add_argument("--part", default="1/1", metavar="K/N",
                    help="run the K-th of N equal slices of the grid (a default grid run takes ~25 minutes)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        gpus = GPUs(1, 80 * GIB, "H100", peak_for("H100"))
    else:
        import torch

        name = torch.cuda.get_device_name(0)
        gpus = GPUs(1, torch.cuda.get_device_properties(0).total_memory, name, peak_for(name))
    print(f"{'configuration':62s} {'pred GiB':>8s} {'meas GiB':>8s} {'err':>6s} {'need':>6s} {'rsvd':>6s} "
          f"{'pred tok/s':>10s} {'meas tok/s':>10s} {'err':>6s}", flush=True)  # fmt: skip
    rows = {}
    k, n = (int(x) for x in args.part.split("/"))
    configs = grid(args.grid) if args.grid != "none" else []
    for cfg in configs[(k - 1) * len(configs) // n : k * len(configs) // n]:
        rows[cfg] = measure(cfg, gpus, out, args.steps, args.timeout, args.dry_run)
    for budget in args.budgets:
        check_budget(budget, rows, gpus, lambda cfg: measure(cfg, gpus, out, args.steps, args.timeout, args.dry_run))
    with open(out / "plan_accuracy.jsonl", "a") as f:
        for row in rows.values():
            f.write(json.dumps(row) + "\n")
    ok = [row for row in rows.values() if "error" not in row]
    if ok:
        worst = max(ok, key=lambda row: abs(row["memory_error"]))
        print(f"\nworst memory error {worst['memory_error']:+.1%} ({worst['config']}); target within 10%: "
              f"{'met' if abs(worst['memory_error']) <= 0.10 else 'NOT met'}")  # fmt: skip


def check_budget(budget_gib: float, rows: dict, gpus: GPUs, run) -> None:
    """For each (model, method, targets, sequence) of the measured rows: the plan's pick for a
    `budget_gib` GPU (run when not measured yet) against the fastest measured row that fits."""
    keys = {(cfg.model, cfg.method, cfg.lora.targets, cfg.data.seq_len): cfg for cfg in rows}
    small = GPUs(1, int(budget_gib * GIB), gpus.name, gpus.peak_flops)
    for key, cfg in keys.items():
        plan = make_plan(cfg, small, (cfg.method,), lossy=True)
        if plan.chosen is None:
            print(f"{budget_gib:g} GiB {key}: the plan finds nothing that fits")
            continue
        chosen = plan.chosen.config
        if chosen not in rows:
            rows[chosen] = run(chosen)
        row = rows[chosen]
        group = [r for c, r in rows.items() if "error" not in r
                 and (c.model, c.method, c.lora.targets, c.data.seq_len) == key]  # fmt: skip
        fitting = [r for r in group if r["measured_reserved_gib"] <= budget_gib]
        if "error" in row:
            print(f"{budget_gib:g} GiB {key}: recommended {row['config']}: {row['error'][:80]}")
            continue
        best = max(fitting, key=lambda r: r["measured_tok_s"], default=None)
        fits = row["measured_reserved_gib"] <= budget_gib
        ratio = row["measured_tok_s"] / best["measured_tok_s"] if best else float("nan")
        print(f"{budget_gib:g} GiB {key}: recommended {row['config']}: reserved {row['measured_reserved_gib']} GiB "
              f"({'fits' if fits else 'OVER BUDGET'}), {ratio:.2f} of the fastest of {len(fitting)} measured that fit "
              f"(target >= 0.85)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
