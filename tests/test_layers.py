"""The house's layer rules (README "Layout"), held against the real imports: a forbidden import or an
import cycle fails the default test run. Reads the code as text (ast); imports nothing of it.

Layers, bottom to top; a layer imports only layers below it:
models -> runtime -> export -> pruning | unlearning | attacks | finetune -> benchmarks (harness)
-> studies | testbed -> stages -> pipeline (runner) -> cli.
"""

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("toolchain", "export", "benchmarks")
# (module prefix, layer); the first prefix that matches wins, so sub-packages come before their parent
LAYERS = [
    ("toolchain.models", "models"),
    ("toolchain.runtime", "runtime"),
    ("export", "export"),
    ("toolchain.pruning", "pruning"),
    ("toolchain.unlearning", "unlearning"),
    ("toolchain.attacks", "attacks"),
    ("toolchain.finetune", "finetune"),
    ("benchmarks.studies", "studies"),
    ("benchmarks.testbed", "testbed"),
    ("benchmarks", "bench"),
    ("toolchain.stages", "stages"),
    ("toolchain.pipeline", "runner"),
    ("toolchain.cli", "cli"),
]
ABOVE_MODELS = {"runtime", "export", "pruning", "unlearning", "attacks", "finetune", "bench", "studies", "testbed"}
ABOVE_MODELS |= {"stages", "runner", "cli"}
NEVER = {
    "core": ABOVE_MODELS,  # config, artifact, errors, runfolder: the runner's plain parts, below every layer but models
    "models": ABOVE_MODELS,
    "runtime": ABOVE_MODELS - {"runtime"},
    "export": {
        "pruning",
        "unlearning",
        "attacks",
        "finetune",
        "bench",
        "studies",
        "testbed",
        "stages",
        "runner",
        "cli",
    },
    "pruning": {"unlearning", "attacks", "finetune", "bench", "studies", "testbed", "stages", "runner", "cli"},
    "unlearning": {
        "pruning",
        "export",
        "attacks",
        "finetune",
        "bench",
        "studies",
        "testbed",
        "stages",
        "runner",
        "cli",
    },
    "attacks": {"pruning", "unlearning", "finetune", "bench", "studies", "testbed", "stages", "runner", "cli"},
    "finetune": {"pruning", "bench", "studies", "testbed", "stages", "runner", "cli"},
    "bench": {"pruning", "unlearning", "finetune", "studies", "stages", "runner", "cli"},
    "testbed": {"studies", "stages", "runner", "cli"},
    "stages": {"studies", "runner", "cli"},
    "runner": {"studies", "cli"},
}


def layer(module: str) -> str:
    for prefix, name in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "core"  # toolchain.config, artifact, errors, runfolder, ...: plain modules every layer may use


def modules(root: Path) -> dict[str, Path]:
    files = [p for pkg in PACKAGES if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py")]
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file, lazy imports included)."""
    mods = modules(root)
    edges = collections.defaultdict(set)
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != module and not module.startswith(name + "."):  # a package's own registry
                    edges[module].add(name)
    return edges


def forbidden(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs if layer(b) in NEVER.get(layer(a), ()))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in list(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_forbidden_import():
    assert forbidden(import_graph(ROOT)) == []


def test_no_import_cycle():
    assert cycles(import_graph(ROOT)) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("importer", "line"),
    [
        ("export/onnx.py", "from benchmarks.latency import time_callable"),
        ("toolchain/runtime/ort.py", "from toolchain.stages import benchmark"),
        ("toolchain/unlearning/esd.py", "    from toolchain.pruning.channels import prune_unet_channels"),
        ("benchmarks/leakage.py", "import toolchain.finetune.data"),
        ("toolchain/models/io.py", "from toolchain.runtime import sampler"),
    ],
)
def test_the_check_fails_on_an_added_forbidden_import(tmp_path, importer, line):
    """The contract bites: the same tree with one forbidden import added (lazy, inside a function,
    counts too) is reported, naming the edge."""
    files = {f"{m.replace('.', '/')}.py": "" for m in ("benchmarks/latency", "toolchain/stages/benchmark")}
    files |= {
        p: "" for p in ("toolchain/pruning/channels.py", "toolchain/finetune/data.py", "toolchain/runtime/sampler.py")
    }
    files[importer] = "def f():\n" + (line if line.startswith(" ") else "    " + line) + "\n"
    edges = import_graph(_tree(tmp_path, files))
    (edge,) = forbidden(edges)
    assert edge.startswith(importer.removesuffix(".py").replace("/", "."))


def test_the_check_finds_a_cycle(tmp_path):
    root = _tree(
        tmp_path,
        {
            "benchmarks/leakage.py": "from toolchain.attacks import prefix\n",
            "toolchain/attacks/prefix.py": "def f():\n    from toolchain.finetune import data\n",
            "toolchain/finetune/data.py": "import benchmarks.leakage\n",
        },
    )
    (component,) = cycles(import_graph(root))
    assert component == ["benchmarks.leakage", "toolchain.attacks.prefix", "toolchain.finetune.data"]
