"""The kit's layers, lowest first: no module imports one above it (lazy imports inside functions count too), and the
stages after training (inference, evaluation) import nothing from `train/`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# koala_lib's top-level names, lowest layer first; a module may import its own layer and any below.
LAYERS = (
    ("files", "progress", "metrics", "typed_yaml", "plots", "call_cache"),
    ("model",),
    ("config", "config_sources", "manifest"),
    ("data",),
    ("conditioning",),
    ("train",),
    ("inference",),
    ("evaluation",),
    ("pipeline", "nbtools", "lab", "doctor", "run_numbers", "run_diff", "cli", "cli_eval"),
)
# (importer, imported): pairs that the order alone would allow but the design does not.
APART = {("inference", "train"), ("evaluation", "train")}


def top_name(module: str) -> str | None:
    """`model` for koala_lib.model.llama; None outside the kit; "" for the package itself."""
    parts = module.split(".")
    if parts[0] != "koala_lib":
        return None
    return parts[1] if len(parts) > 1 else ""


def layer(name: str) -> int:
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise KeyError(name)


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file; `from pkg import name` yields pkg.name (name may be a
    module), and relative imports are resolved against `package`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return out


def violations(root: Path) -> list[str]:
    """Every upward or forbidden import under root/koala_lib, and every top-level name no layer places."""
    found = []
    for path in sorted((root / "koala_lib").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rsplit(".", 1)[0]
        mine = top_name(module)
        if mine == "":
            continue
        try:
            my_layer = layer(mine)
        except KeyError:
            found.append(f"{path.relative_to(root)}: koala_lib.{mine} is in no layer; add it to LAYERS")
            continue
        for line, target in imports(path, package):
            theirs = top_name(target)
            if not theirs or theirs == mine:
                continue
            try:
                their_layer = layer(theirs)
            except KeyError:
                continue  # `from koala_lib import __version__` and the like
            if their_layer > my_layer:
                found.append(f"{path.relative_to(root)}:{line}: {mine} imports {target}, a layer above it")
            elif (mine, theirs) in APART:
                found.append(f"{path.relative_to(root)}:{line}: {mine} imports {target}; only pipeline and the CLI may")
    return found


def test_no_import_points_up():
    assert violations(ROOT) == []


@pytest.mark.parametrize(("module", "line", "expected"), [
    ("plots.py", "from koala_lib.conditioning.packing import pack_plan", "plots imports koala_lib.conditioning.packing.pack_plan"),
    ("model/llama.py", "    from koala_lib import config", "model imports koala_lib.config"),
    ("inference/serve.py", "from koala_lib.train.data import BATCH_SPEC", "inference imports koala_lib.train.data.BATCH_SPEC"),
    ("data/readers.py", "from ..train import loop", "data imports koala_lib.train.loop"),
])
def test_an_upward_import_is_found(tmp_path, module, line, expected):
    """The check itself: a copy of the kit with one import added that points up (or into train from a later
    stage) fails it, naming the file and the import."""
    for path in (ROOT / "koala_lib").rglob("*.py"):
        dest = tmp_path / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert violations(tmp_path) == []
    target = tmp_path / "koala_lib" / module
    body = target.read_text(encoding="utf-8")
    if line.startswith(" "):
        body += f"\n\ndef _added():\n{line}\n"
    else:
        body += f"\n{line}\n"
    target.write_text(body, encoding="utf-8")
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"koala_lib/{module}:") and expected in found[0], found


def test_a_module_outside_every_layer_is_named(tmp_path):
    (tmp_path / "koala_lib").mkdir()
    (tmp_path / "koala_lib" / "helpers.py").write_text("import json\n", encoding="utf-8")
    assert violations(tmp_path) == ["koala_lib/helpers.py: koala_lib.helpers is in no layer; add it to LAYERS"]


def test_bench_scripts_share_helpers_without_a_cycle():
    """bench/ scripts import helpers by bare name (`from results import ...`); no two import each other."""
    names = {p.stem for p in (ROOT / "bench").glob("*.py")}
    graph = {p.stem: {t.split(".")[0] for _, t in imports(p, "bench")} & names for p in (ROOT / "bench").glob("*.py")}
    cycles = sorted((a, b) for a in graph for b in graph[a] if a in graph.get(b, ()) and a < b)
    assert cycles == []
    assert "workload" in graph["train_step"] and "workload" in graph["train_gpu"]
