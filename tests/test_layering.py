"""The import graph of ``mmfm_jax``, read statically (``ast`` over every module, imports inside functions and
``TYPE_CHECKING`` blocks and relative imports included): no import cycle between modules, and every import goes
down :data:`LAYERS` or stays inside its own package. A job module imports no other job module.

``LAYERS`` is the one table of the layers (``docs/architecture.md`` explains it). A module may import a module of
its own package (a top-level module counts as a package of its own) or of a lower layer; packages of one layer are
independent of each other: what two of them share moves down a layer.
"""

from __future__ import annotations

import ast
import collections
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mmfm_jax"

# (packages or top-level modules of mmfm_jax, what the layer is), lowest layer first.
LAYERS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("config_utils", "torch_io"), "ConfigError and the checks that name a config key; the safe torch .pt reader"),
    (("storage",), "files on any store (local or gs://): atomic writes, JSON/npz, local copies, bucket checks"),
    (("utils", "parallel", "distributed", "config_files"), "metric writer, progress, dtypes; device mesh and "
                                                           "shardings; multi-process set-up; config files, "
                                                           "command-line overrides, load_config"),
    (("workdir",), "the run folder: stages, locks, done markers, overwrite"),
    (("ops",), "numerical kernels shared by models, flow and data (e.g. the torch-exact resize)"),
    (("models", "gmm", "flow"), "networks (Flax NNX); Gaussian mixtures and the mode-coupling source; flow matching"),
    (("convert",), "official and hub checkpoints -> the models' parameters (strict keys)"),
    (("data", "eval"), "image sources, latents, statistics, the encoding program; features and metrics"),
    (("train", "release"), "train state, step, checkpoints, the sampling program; official release fetch/convert"),
    (("experiments",), "studies built on the library (digits demo, toy); they never import a job"),
    (("jobs", "api"), "the CLI's jobs (wiring of the library); the Python API"),
    (("plan", "bench"), "tools over the jobs: the TPU planner and the benchmarks compile and time the jobs' programs"),
    (("cli", "launch"), "the command line (jobs and tools by name) and the multi-host launchers"),
    (("__main__",), "python -m mmfm_jax"),
)
RANK = {pkg: rank for rank, (pkgs, _) in enumerate(LAYERS) for pkg in pkgs}
JOBS_SHARED = {"mmfm_jax.jobs", "mmfm_jax.jobs.common"}  # the registry and the helpers every job may import

Graph = dict[str, list[tuple[str, int]]]  # module -> [(imported module, line)]


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package at ``root`` (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


@functools.cache
def import_graph(root: Path) -> Graph:
    """Every module's imports of modules of the same package, resolved to the deepest existing module:
    ``from pkg.a import b`` is ``pkg.a.b`` when that is a module, else ``pkg.a``."""
    mods = modules(root)
    top = root.name
    graph: Graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    assert node.level <= len(parts), f"{path}:{node.lineno}: relative import beyond {top}"
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                if target != top and not target.startswith(top + "."):
                    continue
                while target not in mods and "." in target:
                    target = target.rpartition(".")[0]
                if target != name:
                    found.append((target, node.lineno))
        graph[name] = sorted(set(found), key=lambda t: (t[1], t[0]))
    return graph


def package_of(module: str) -> str | None:
    """``mmfm_jax.gmm.em`` -> ``gmm``; ``mmfm_jax.cli`` -> ``cli``; the root package -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def why_not(src: str, dst: str) -> str | None:
    """Why ``src`` may not import ``dst`` (None: it may)."""
    a, b = package_of(src), package_of(dst)
    if b is None:
        return None
    if a == b:
        if a == "jobs" and dst not in JOBS_SHARED:
            return "a job imports no other job: only jobs.common and the registry"
        return None
    if a is None or a not in RANK or b not in RANK:
        return None  # reported by test_every_module_is_in_a_layer
    if RANK[b] < RANK[a]:
        return None
    if RANK[b] > RANK[a]:
        return f"{b} is in a higher layer than {a}"
    return f"{a} and {b} share a layer: neither imports the other"


def violations(graph: Graph, root: Path = ROOT) -> list[str]:
    mods = modules(root)
    out = []
    for src in sorted(graph):
        for dst, line in graph[src]:
            reason = why_not(src, dst)
            if reason is not None:
                out.append(f"{mods[src].relative_to(root.parent)}:{line}: {src} -> {dst} ({reason})")
    return out


def cycles(graph: Graph) -> list[tuple[list[str], list[str]]]:
    """Every strongly connected component of more than one module (Tarjan): (its sorted members, one shortest
    cycle through the first of them, ``[a, b, a]``)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in sorted(comps):
        start, members = comp[0], set(comp)
        parent: dict[str, str | None] = {start: None}
        queue, end = collections.deque([start]), None
        while end is None:  # breadth-first inside the component until an import leads back to start
            v = queue.popleft()
            for w, _ in graph[v]:
                if w == start:
                    end = v
                    break
                if w in members and w not in parent:
                    parent[w] = v
                    queue.append(w)
        path: list[str] = []
        while end is not None:
            path.append(end)
            end = parent[end]
        out.append((comp, [*path[::-1], start]))
    return out


def format_cycle(members: list[str], cycle: list[str]) -> str:
    shown = " -> ".join(cycle)
    return shown if len(members) == len(cycle) - 1 else f"{{{', '.join(members)}}}, e.g. {shown}"


def test_every_module_is_in_a_layer():
    unplaced = sorted({p for p in map(package_of, modules(ROOT)) if p is not None and p not in RANK})
    assert not unplaced, f"packages or top-level modules of mmfm_jax in no layer: {unplaced} (add them to LAYERS)"


def test_imports_go_down_the_layers():
    bad = violations(import_graph(ROOT))
    assert not bad, "imports against the layer order (tests/test_layering.py LAYERS):\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    found = [format_cycle(*c) for c in cycles(import_graph(ROOT))]
    assert not found, "import cycles:\n  " + "\n  ".join(found)


def test_the_checker_sees_function_level_relative_and_cyclic_imports(tmp_path):
    """A small fake ``mmfm_jax``: an upward import inside a function, a sideways relative import, a job importing
    a job, a three-module cycle; allowed imports stay quiet."""
    files = {
        "__init__.py": "",
        "utils.py": "import os\n",
        "storage.py": "from mmfm_jax import config_utils\n",  # down a layer: fine
        "config_utils.py": "",
        "models/__init__.py": "",
        "models/a.py": "def f():\n    from ..train import step\n    return step\n",  # up, inside a function
        "models/b.py": "from . import a\nfrom ..gmm.em import fit\n",  # own package fine; gmm beside models
        "gmm/__init__.py": "",
        "gmm/em.py": "import mmfm_jax.gmm.kmeans\nfit = 1\n",
        "gmm/kmeans.py": "from mmfm_jax.gmm import mstep\n",
        "gmm/mstep.py": "from .em import fit\n",  # closes em -> kmeans -> mstep -> em
        "train/__init__.py": "",
        "train/step.py": "from mmfm_jax.utils import os\n",
        "jobs/__init__.py": "",
        "jobs/common.py": "",
        "jobs/a.py": "from mmfm_jax.jobs import common\nfrom mmfm_jax.jobs.b import x\n",
        "jobs/b.py": "x = 1\n",
    }
    root = tmp_path / "mmfm_jax"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    graph = import_graph(root)
    assert ("mmfm_jax.config_utils", 1) in graph["mmfm_jax.storage"]
    assert graph["mmfm_jax.train.step"] == [("mmfm_jax.utils", 1)]  # `os` is a name, not a module
    assert violations(graph, root) == [
        "mmfm_jax/jobs/a.py:2: mmfm_jax.jobs.a -> mmfm_jax.jobs.b (a job imports no other job: only jobs.common and "
        "the registry)",
        "mmfm_jax/models/a.py:2: mmfm_jax.models.a -> mmfm_jax.train.step (train is in a higher layer than models)",
        "mmfm_jax/models/b.py:2: mmfm_jax.models.b -> mmfm_jax.gmm.em (models and gmm share a layer: neither "
        "imports the other)",
    ]
    assert [format_cycle(*c) for c in cycles(graph)] == [
        "mmfm_jax.gmm.em -> mmfm_jax.gmm.kmeans -> mmfm_jax.gmm.mstep -> mmfm_jax.gmm.em"]
