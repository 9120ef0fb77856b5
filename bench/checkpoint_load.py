"""Create and load gpt-oss-20b (MXFP4 experts) and report time and peak memory.

    python bench/checkpoint_load.py [--path DIR] [--preset gpt-oss-20b] [--keep] [--skip-create]
                                    [--device cpu|cuda] [--forward]

Each phase runs in a fresh child process so that its peak resident set size (ru_maxrss, stdlib)
is its own. Phases: `create` (osstune create --mxfp4), `load` (load_model on CPU, experts packed),
and, when CUDA is available (or --device cuda), `load-cuda` (straight onto the GPU, experts packed:
torch.cuda.memory_allocated / max_memory_allocated). Reading a checkpoint that was just written
is served from the page cache; the load figures are warm-cache figures.
Default path: a temporary directory, deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def dir_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e9


def phase(name: str, path: Path, preset: str, forward: bool, create_device: str = "cpu") -> dict:
    import torch

    import osstune

    result: dict = {"phase": name, "rss_before_gb": round(peak_rss_gb(), 2)}
    start = time.perf_counter()
    if name == "create":
        from osstune.create import create_checkpoint

        create_checkpoint(preset, path, mxfp4=True, write_tokenizer=False, overwrite=True, device=create_device)
        result["checkpoint_gb"] = round(dir_gb(path), 2)
    else:
        device = "cuda" if name == "load-cuda" else "cpu"
        model = osstune.load_model(path, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        result["seconds_load"] = round(time.perf_counter() - start, 1)
        result["peak_rss_after_load_gb"] = round(peak_rss_gb(), 2)
        tensors = [*model.parameters(), *model.buffers()]
        result["model_gb"] = round(sum(t.numel() * t.element_size() for t in tensors) / 1e9, 2)
        result["expert_format"] = model.config.expert_format
        if device == "cuda":
            result["cuda_allocated_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
            result["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if forward:
            with torch.no_grad():
                t0 = time.perf_counter()
                logits = model(torch.tensor([[200006, 1428, 200008]], device=device))
                result["seconds_forward_3_tokens"] = round(time.perf_counter() - t0, 1)
                result["logits_finite"] = bool(torch.isfinite(logits).all())
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["peak_rss_gb"] = round(peak_rss_gb(), 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=None, help="checkpoint directory (default: a temp dir)")
    ap.add_argument("--preset", default="gpt-oss-20b")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--skip-create", action="store_true", help="load an existing checkpoint at --path")
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    ap.add_argument("--forward", action="store_true", help="also run a 3-token forward pass")
    # Where `create` draws and packs the random weights: cuda takes seconds on a GPU machine instead of
    # minutes on its CPU (other values, the same layout and sizes).
    ap.add_argument("--create-device", default="cpu")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.path, args.preset, args.forward, args.create_device)))
        return

    import torch

    tmp = None
    if args.path is None:
        tmp = Path(tempfile.mkdtemp(prefix="osstune-bench-"))
        args.path = tmp / args.preset
    phases = [] if args.skip_create else ["create"]
    if args.device in ("cpu", "auto"):
        phases.append("load")
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        phases.append("load-cuda")
    try:
        for name in phases:
            cmd = [sys.executable, __file__, "--phase", name, "--path", str(args.path), "--preset", args.preset]
            cmd += ["--forward"] if args.forward else []
            cmd += ["--create-device", args.create_device]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)
    finally:
        if not args.keep and not args.skip_create:
            shutil.rmtree(tmp or args.path, ignore_errors=True)


if __name__ == "__main__":
    main()
