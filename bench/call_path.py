"""How many files the training path crosses (issue 17): a static call graph of qsmrim, jobs and serving.

    python bench/call_path.py [--from qsmrim.pipeline.run_pipeline] [--to qsmrim.training.fit.fit_member]

Every module-level function and class method is a node. An edge goes from a function to every project
function or class it names in its body (a call, or a reference such as ``TorchTrainer(train_fn_per_worker)``),
resolving ``from x import y`` (module level or inside the function, re-exports followed), ``module.attr`` and
``Class.method``; naming a class reaches its ``__init__``/``__post_init__``. Method calls on instances are not resolved. Prints the
files reachable from ``--from`` (the whole job) and the files on some chain from ``--from`` to ``--to`` (the
training path), each in the order first reached, and the calls on that path that cross from one file to another, and how many
functions reachable from ``--from`` call each pipeline stage.
"""

from __future__ import annotations

import argparse
import ast
from collections import deque
from pathlib import Path

ROOTS = ("qsmrim", "jobs", "serving")
#: The stages run_pipeline should call once each, and where the functions behind them have lived.
STAGES = ("qsmrim.experiment.prepare_run", "qsmrim.grid.ray_grid.run_grid", "qsmrim.training.evaluate_run.evaluate_run",
          "qsmrim.export.run.export_run")


def _module_name(path: Path, repo: Path) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class _Index:
    """Definitions (functions, classes, methods) and import bindings of every project module."""

    def __init__(self, repo: Path) -> None:
        self.files: dict[str, Path] = {}
        self.defs: dict[str, ast.AST] = {}
        self.classes: dict[str, list[str]] = {}
        self.bindings: dict[str, dict[str, str]] = {}
        for root in ROOTS:
            for path in sorted((repo / root).rglob("*.py")):
                mod = _module_name(path, repo)
                self.files[mod] = path.relative_to(repo)
                tree = ast.parse(path.read_text(encoding="utf-8"))
                self.bindings[mod] = self._bindings(tree, mod, path.name == "__init__.py")
                for node in tree.body:
                    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                        self.defs[f"{mod}.{node.name}"] = node
                    elif isinstance(node, ast.ClassDef):
                        cls = f"{mod}.{node.name}"
                        self.defs[cls] = node
                        self.classes[cls] = []
                        for item in node.body:
                            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                                self.defs[f"{cls}.{item.name}"] = item
                                self.classes[cls].append(f"{cls}.{item.name}")

    @staticmethod
    def _bindings(tree: ast.Module, mod: str, is_package: bool) -> dict[str, str]:
        out: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_package else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                for alias in node.names:
                    out[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    out[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        return out

    def resolve(self, dotted: str, depth: int = 0) -> str | None:
        """The definition a dotted name stands for, following re-exports; None outside the project."""
        if dotted in self.defs or depth > 10:
            return dotted if dotted in self.defs else None
        mod, _, name = dotted.rpartition(".")
        if mod in self.bindings and name in self.bindings[mod]:
            return self.resolve(self.bindings[mod][name], depth + 1)
        if mod and mod not in self.files:  # Class.method or module.attr through a binding
            owner = self.resolve(mod, depth + 1)
            if owner is not None and f"{owner}.{name}" in self.defs:
                return f"{owner}.{name}"
        return None

    def module_of(self, node: str) -> str:
        while node not in self.files:
            node = node.rpartition(".")[0]
        return node

    def edges(self, node: str) -> set[str]:
        if node in self.classes:  # naming a class constructs it
            return {m for m in self.classes[node] if m.rpartition(".")[2] in ("__init__", "__post_init__")}
        mod = self.module_of(node)
        local = self.bindings[mod]
        out: set[str] = set()
        for sub in ast.walk(self.defs[node]):
            dotted = _dotted(sub)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            base = local.get(head) or (f"{mod}.{head}" if f"{mod}.{head}" in self.defs else None)
            if base is None:
                continue
            target = self.resolve(f"{base}.{rest}" if rest else base)
            if target is not None and target != node:
                out.add(target)
        return out


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def reachable(index: _Index, start: str) -> dict[str, int]:
    """Nodes reachable from ``start``, with their BFS order."""
    seen = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(index.edges(node)):
            if nxt not in seen:
                seen[nxt] = len(seen)
                queue.append(nxt)
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--from", dest="start", default="qsmrim.pipeline.run_pipeline")
    p.add_argument("--to", dest="end", default="qsmrim.training.fit.fit_member")
    args = p.parse_args(argv)
    index = _Index(Path(args.repo))
    start, end = index.resolve(args.start), index.resolve(args.end)
    if start is None or end is None:
        raise SystemExit(f"unknown function: {args.start if start is None else args.end}")
    forward = reachable(index, start)
    on_path = {n for n in forward if n == end or end in reachable(index, n)}

    def files(nodes: set[str] | dict[str, int]) -> list[str]:
        order: dict[str, int] = {}
        for n in sorted(nodes, key=lambda n: forward[n]):
            order.setdefault(str(index.files[index.module_of(n)]), forward[n])
        return list(order)

    whole, path = files(forward), files(on_path)
    crossings = {(index.module_of(a), index.module_of(b)) for a in on_path for b in index.edges(a) & on_path}
    crossings = {(a, b) for a, b in crossings if index.files[a] != index.files[b]}
    print(f"from {start}: {len(forward)} functions in {len(whole)} files")
    print(f"on a chain to {end}: {len(on_path)} functions in {len(path)} files, {len(crossings)} file-to-file calls")
    for f in path:
        print(f"  {f}")
    for stage in STAGES:
        target = index.resolve(stage)
        callers = sorted(n for n in forward if target in index.edges(n))
        print(f"{stage} called from {len(callers)} place(s): {', '.join(callers)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
