"""The house rules of the code base, checked on the source itself (issue 13).

* imports run one way: entry points -> training / scoring / benchmark -> data / augment / checkpoint
  -> model, shard_tools; `benchmark` never imports `training` or `scoring`; the loader backends
  never import `pipeline.data.loader`; nothing imports an entry point but `demo`; `model` and
  `shard_tools` never import `pipeline`; no import cycle between modules;
* no module over 400 lines, no function over 60 lines;
* every module is in the wheel's package list (`setup.cfg` finds sub-packages).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "model", "shard_tools")
ENTRY_POINTS = {f"pipeline.{n}" for n in ("train", "evaluate", "predict", "export", "bench", "demo", "sbi_sheet")} | {
    "shard_tools.pack", "shard_tools.inspect"}
# Layer of each module prefix (longest prefix wins); a module may import only its own layer or lower.
LAYERS = {
    "pipeline": 4,  # the entry points (and the package __init__)
    "pipeline.training": 3, "pipeline.scoring": 3, "pipeline.benchmark": 3,
    "pipeline.data": 2, "pipeline.augment": 2, "pipeline.checkpoint": 2,
    "model": 1, "shard_tools": 1,
}
FORBIDDEN = [  # (importer prefix, imported prefix, why)
    ("pipeline.benchmark", "pipeline.training", "benchmark never imports training"),
    ("pipeline.benchmark", "pipeline.scoring", "benchmark never imports scoring"),
    ("pipeline.data.torch_backend", "pipeline.data.loader", "backends never import build_loader's module"),
    ("pipeline.data.dali_backend", "pipeline.data.loader", "backends never import build_loader's module"),
    ("pipeline.data.dali_graph", "pipeline.data.loader", "backends never import build_loader's module"),
    ("pipeline.augment", "pipeline.data", "augmentation never imports the data layer"),
    ("model", "pipeline", "model never imports pipeline"),
    ("model", "shard_tools", "model never imports shard_tools"),
    ("shard_tools", "pipeline", "shard_tools never imports pipeline"),
    ("pipeline.scoring", "pipeline.training", "scoring never imports training"),
]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, packages: Iterable[str] = PACKAGES) -> Dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """In-repo modules that ``name`` imports (also inside functions), resolved to module names."""
    out: Set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]  # a name, or else its module
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer(name: str, layers: Dict[str, int]) -> Optional[int]:
    best = max((p for p in layers if name == p or name.startswith(p + ".")), key=len, default=None)
    return None if best is None else layers[best]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check_imports(graph: Dict[str, Set[str]], *, layers=LAYERS, forbidden=FORBIDDEN,
                  entry_points=ENTRY_POINTS, entry_importers=("pipeline.demo",)) -> List[str]:
    """Every broken rule, as 'A imports B: why'."""
    problems = []
    for a, deps in sorted(graph.items()):
        for b in sorted(deps):
            reasons = [why for src, dst, why in forbidden if _under(a, src) and _under(b, dst)]
            if b in entry_points and a not in entry_importers:
                reasons.append(f"nothing imports an entry point but {', '.join(entry_importers)}")
            la, lb = layer(a, layers), layer(b, layers)
            if la is not None and lb is not None and lb > la and b not in entry_points:
                reasons.append(f"imports run one way (layer {la} may not import layer {lb})")
            if reasons:  # the most specific reason names the pair once
                problems.append(f"{a} imports {b}: {reasons[0]}")
    return problems


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as [m0, m1, ..., m0], or None."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def graph_of(root: Path, packages: Iterable[str] = PACKAGES) -> Dict[str, Set[str]]:
    mods = modules(root, packages)
    known = set(mods)
    # a package's __init__ importing its own sub-modules is not an upward edge
    return {n: {d for d in imports_of(n, p, known) if not _under(d, n) or p.name != "__init__.py"}
            for n, p in mods.items()}


def sizes(root: Path) -> Tuple[List[str], List[str]]:
    long_modules, long_functions = [], []
    for name, path in modules(root).items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(root)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {n} lines")
    return long_modules, long_functions


def test_imports_run_one_way():
    assert check_imports(graph_of(REPO)) == []


def test_no_import_cycle():
    assert find_cycle(graph_of(REPO)) is None


def test_module_and_function_sizes():
    long_modules, long_functions = sizes(REPO)
    assert long_modules == [] and long_functions == []


def _write(root: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("files, expected", [
    ({"model/__init__.py": "from pipeline.data import shards\n"}, "model imports pipeline.data.shards: model never imports pipeline"),
    ({"shard_tools/x.py": "def f():\n    import pipeline.checkpoint\n"}, "shard_tools.x imports pipeline.checkpoint: shard_tools never imports pipeline"),
    ({"pipeline/benchmark/rows.py": "from pipeline.scoring.metrics import binary_metrics\n"}, "benchmark never imports scoring"),
    ({"pipeline/data/torch_backend.py": "from pipeline.data.loader import build_loader\n"}, "backends never import build_loader's module"),
    ({"pipeline/data/shards.py": "from pipeline.training import loop\n"}, "imports run one way (layer 2 may not import layer 3)"),
    ({"pipeline/scoring/score.py": "from pipeline import evaluate\n"}, "nothing imports an entry point"),
])
def test_checker_names_the_two_modules(tmp_path, files, expected):
    base = {"pipeline/__init__.py": "", "pipeline/data/__init__.py": "", "pipeline/data/shards.py": "",
            "pipeline/data/loader.py": "", "pipeline/data/torch_backend.py": "", "pipeline/training/__init__.py": "",
            "pipeline/training/loop.py": "", "pipeline/scoring/__init__.py": "", "pipeline/scoring/metrics.py": "",
            "pipeline/scoring/score.py": "", "pipeline/checkpoint.py": "", "pipeline/evaluate.py": "",
            "pipeline/benchmark/__init__.py": "", "model/__init__.py": "", "shard_tools/__init__.py": ""}
    _write(tmp_path, {**base, **files})
    problems = check_imports(graph_of(tmp_path))
    assert len(problems) == 1 and expected in problems[0], problems


def test_checker_finds_a_cycle(tmp_path):
    _write(tmp_path, {"pipeline/__init__.py": "", "pipeline/data/__init__.py": "",
                      "pipeline/data/a.py": "from pipeline.data.b import x\n", "pipeline/data/b.py": "from pipeline.data import a\n",
                      "model/__init__.py": "", "shard_tools/__init__.py": ""})
    assert find_cycle(graph_of(tmp_path)) == ["pipeline.data.a", "pipeline.data.b", "pipeline.data.a"]
    _write(tmp_path, {"pipeline/data/b.py": "x = 1\n"})
    assert find_cycle(graph_of(tmp_path)) is None


def test_checker_flags_long_functions(tmp_path, monkeypatch):
    body = "def f():\n" + "    x = 1\n" * 70
    _write(tmp_path, {"pipeline/__init__.py": "", "pipeline/long.py": body, "model/__init__.py": "",
                      "shard_tools/__init__.py": ""})
    long_modules, long_functions = sizes(tmp_path)
    assert long_modules == [] and long_functions == ["pipeline/long.py:1 f: 71 lines"]


def test_wheel_lists_every_package():
    """setup.cfg finds sub-packages: every folder of a package holds an __init__.py (an editable
    install would hide a missing one; `pip wheel . --no-deps` would drop its modules)."""
    cfg = (REPO / "setup.cfg").read_text()
    assert "packages = find:" in cfg
    missing = [str(d.relative_to(REPO)) for pkg in PACKAGES for d in [REPO / pkg, *(REPO / pkg).rglob("*")]
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")) and not (d / "__init__.py").exists()]
    assert missing == []
