"""The layer order of ../STYLE.md, checked on the source: a module imports only from layers below it
(or from its own unit), so that, e.g., the reference model never imports a kernel and nothing imports
the command line. Lazy imports inside functions count: they are dependencies all the same.

Also: `osstune --help` starts without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "osstune"

# Unit (a module or package prefix; the longest match wins) -> layer. A module may import from its own
# unit and from units of strictly lower layers.
LAYERS = {
    # Plain helpers every layer may use: no torch, no osstune imports.
    "osstune.fields": 0, "osstune.errors": 0, "osstune.atomic": 0, "osstune.interrupt": 0,
    # Configuration: frozen dataclasses, no torch. A training config holds a LoRA config.
    "osstune.config": 1, "osstune.lora.config": 1, "osstune.parallel.config": 1,
    "osstune.train.config": 2, "osstune.train.recipe": 2,
    # Beside each other, each on config only: data (no model, no kernels), number formats, device choice.
    "osstune.data": 3, "osstune.quant": 3, "osstune.device": 3,
    # The reference model imports no kernel, and the kernels no model: the same layer, two units.
    "osstune.kernels": 4, "osstune.model": 4,
    # Built on the model (and kernels): checkpoints, MXFP4 linear layers, host offload, the package's
    # own `osstune.load_model`.
    "osstune.checkpoint": 5, "osstune.quant.linear": 5, "osstune.offload": 5, "osstune": 5,
    "osstune.lora": 6,
    # Applied to a built model from outside: the fast path's kernel routing, distributed plans.
    "osstune.fast": 7, "osstune.parallel": 7,
    "osstune.train": 8, "osstune.export": 8, "osstune.create": 8,
    # serve: the engine (scheduler, KV blocks, runner) above everything it runs; chat (infer) and the
    # HTTP server use the engine.
    "osstune.serve": 8, "osstune.infer": 9, "osstune.serve.http": 10,
    # plan sizes what train and serve would hold (their own sizing functions, meta-device models).
    "osstune.plan": 9,
    # Command lines: nothing imports them.
    "osstune.cli": 11, "osstune.__main__": 12, "osstune.demo": 11, "osstune.export_cli": 11, "osstune.train.cli": 11, "osstune.data.cli": 11,
    "osstune.infer.cli": 11, "osstune.plan.cli": 11, "osstune.serve.cli": 11,
}  # fmt: skip

# Units with a narrower rule than their layer's.
FORBIDDEN = {
    # plan reads configs and model shapes (meta device); it never runs a model or serves.
    "osstune.plan": ("osstune.kernels", "osstune.fast", "osstune.train.trainer", "osstune.infer", "osstune.serve.engine",
                     "osstune.serve.http"),
    # The HTTP server speaks to the engine, never to the model.
    "osstune.serve.http": ("osstune.model", "osstune.kernels", "osstune.lora", "osstune.fast"),
}


def _unit(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no layer: add its unit to LAYERS in tests/test_layers.py")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every osstune import in `path`, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from osstune.x import y`: y may be a module of its own (a finer unit).
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, t) for line, t in found if t == "osstune" or t.startswith("osstune.")]


def _modules() -> set[str]:
    return {_module_name(p) for p in ROOT.rglob("*.py")}


def _resolve(target: str, modules: set[str]) -> str:
    while target not in modules and "." in target:
        target = target.rpartition(".")[0]
    return target


def test_no_import_runs_upward():
    modules = _modules()
    problems: list[str] = []
    for path in sorted(ROOT.rglob("*.py")):
        src = _module_name(path)
        if src == "osstune":
            continue  # the package's lazy facade (`osstune.load_model`)
        src_unit = _unit(src)
        for line, target in _imports(path):
            dst = _resolve(target, modules)
            dst_unit = _unit(dst)
            where = f"{path.relative_to(ROOT.parent)}:{line}: {src} imports {dst}"
            if any(dst == f or dst.startswith(f + ".") for f in FORBIDDEN.get(src_unit, ())):
                problem = f"{where} (forbidden for {src_unit})"
            elif dst_unit != src_unit and LAYERS[dst_unit] >= LAYERS[src_unit]:
                problem = f"{where} (layer {LAYERS[dst_unit]} >= {LAYERS[src_unit]})"
            else:
                continue
            if problem not in problems:
                problems.append(problem)
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    # The check above must be able to fail: a model that imports a kernel, lazily, is found.
    fake = tmp_path / "osstune"
    (fake / "kernels").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "kernels" / "__init__.py").write_text("")
    (fake / "model.py").write_text("def f():\n    from .kernels import moe\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    with pytest.raises(AssertionError, match=r"model.py:2: osstune.model imports osstune.kernels"):
        test_no_import_runs_upward()


def test_help_and_configs_import_no_torch():
    # `osstune --help` starts in well under a second; configs are plain dataclasses (layer 1-2).
    code = (
        "import sys; from osstune.cli import build_parser; build_parser();"
        "import osstune.train.config, osstune.train.recipe, osstune.lora.config, osstune.config, osstune.fields;"
        "print(sorted({'torch', 'triton', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == "[]", out.stdout
