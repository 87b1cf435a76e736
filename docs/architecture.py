"""Draw catalogen's packages, their layers and the stages from the code itself (docs/architecture.md).

    python docs/architecture.py          # writes docs/architecture.md
    python docs/architecture.py --check  # exit 1 when docs/architecture.md is not what the code draws now

The arrows come from the code's own imports (an AST scan in which imports inside functions and
under TYPE_CHECKING count), grouped by package; the stages, in pipeline order, come from the
registry (the `catalogen.stages` entry points). tests/test_registry.py checks the same graph: no
import circle, no import from a lower layer into a higher one, and this picture up to date.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "architecture.md"
PACKAGES = ("catalogen", "flows", "tasks")
# Top to bottom: a module imports only from its own layer or below (STYLE.md §6, as the code has it).
LAYERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("cli", ("catalogen.cli",), "the `catalogen` command"),
    ("flows", ("flows",), "the Prefect flows: ordering, concurrency, artifacts"),
    ("stages and publishing", ("tasks", "catalogen.publish"),
     "one module per stage; the report and exports, which read what a run recorded"),
    ("run", ("catalogen.run",), "plan, recipes, batching, device leases, results, status"),
    ("review rules", ("catalogen.review",), "a reviewer's decisions; ranking candidates and gating them"),
    ("stage contract", ("catalogen.registry", "catalogen.stage"), "what a stage is and is given; where stages are found"),
    ("models", ("catalogen.models",), "identity, loading, add-ons, diffusion; the tiny profile"),
    ("configuration", ("catalogen.config",), "the run's settings; each stage's section is attached by the registry"),
    ("media and prompting", ("catalogen.media", "catalogen.prompting"), "what goes into image files; prompts from fields"),
    ("catalog", ("catalogen.catalog",), "reading and checking a catalog"),
    ("storage", ("catalogen.storage",), "the run folder, locations, the bucket lease, hashing"),
    ("base", ("catalogen.stopping", "catalogen"), "stopping on signals; the version"),
)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of catalogen/, flows/ and tasks/ by dotted name (a package by its own name)."""
    found = {}
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported_names(tree: ast.AST, package: str) -> set[str]:
    """Absolute names a module's imports mention, at any depth (`from a import b`: a and a.b)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules it imports (a submodule's import of its own parent package left out)."""
    known = modules(root)
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = {_resolve(n, known) for n in imported_names(ast.parse(path.read_text()), package)}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def layer_of(module: str) -> int:
    """The index in LAYERS (0 = top) of the longest prefix that names `module` or a package holding it."""
    best, found = -1, None
    for index, (_, prefixes, _) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    if found is None:
        raise KeyError(f"{module} is in no layer of docs/architecture.py's LAYERS")
    return found


def package_of(module: str) -> str:
    """The box a module is drawn in: its subpackage of catalogen/, its own name at catalogen's top, flows, tasks."""
    parts = module.split(".")
    if parts[0] != "catalogen":
        return parts[0]
    return parts[1] if len(parts) > 1 else "catalogen"


def _stages() -> list[tuple[str, str, str]]:
    """catalogen's own stages in pipeline order: (name, what it reads, what it provides)."""
    from catalogen.registry import stages

    return [(name, ", ".join(getattr(s, "READS", ())) or "-", ", ".join(getattr(s, "PROVIDES", ())) or "-")
            for name, s in stages().items() if s.__name__.startswith("tasks.")]  # catalogen's own, not plugins


def render(root: Path = ROOT) -> str:
    graph = import_graph(root)
    boxes: dict[str, list[str]] = {}
    for module in graph:
        boxes.setdefault(package_of(module), []).append(module)
    boxes.pop("catalogen", None)  # the package itself holds only the version
    arrows = sorted({(package_of(a), package_of(b)) for a, deps in graph.items() for b in deps
                     if package_of(a) != package_of(b) and "catalogen" not in (package_of(a), package_of(b))})
    lines = ["# catalogen's architecture", "",
             "Drawn from the code by `python docs/architecture.py` (do not edit; tests/test_registry.py checks it).",
             "An arrow is an import (inside functions too); boxes are packages, or modules at catalogen's top;",
             "a module imports only from its own layer or below, and no import runs in a circle.", "",
             "```mermaid", "flowchart TB"]
    for index, (title, _, _) in enumerate(LAYERS):
        members = sorted(b for b in boxes if layer_of(boxes[b][0]) == index)
        if not members:
            continue
        lines.append(f'  subgraph L{index}["{title}"]')
        lines += [f'    {b}["{b}/"]' if len(boxes[b]) > 1 or b in ("flows", "tasks") else f'    {b}["{b}.py"]'
                  for b in members]
        lines.append("  end")
    lines += [f"  {a} --> {b}" for a, b in arrows]
    lines += ["```", "", "## Layers, top to bottom", "", "| layer | holds | packages and modules |", "|---|---|---|"]
    for index, (title, _, what) in enumerate(LAYERS):
        members = sorted(m for m in graph if layer_of(m) == index and m != "catalogen")
        names = ", ".join(f"`{m}`" for m in members)
        lines.append(f"| {title} | {what} | {names} |")
    stages = _stages()
    lines += ["", "## Stages, in pipeline order (the registry's)", "", "```mermaid", "flowchart LR"]
    lines += [f'  {name}["{name}<br/>reads: {reads}<br/>provides: {provides}"]' for name, reads, provides in stages]
    lines += [f"  {a[0]} --> {b[0]}" for a, b in zip(stages, stages[1:])]
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> None:
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            sys.exit(f"{OUT.relative_to(ROOT)} is out of date: run python docs/architecture.py")
        return
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
