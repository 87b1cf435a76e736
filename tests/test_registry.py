"""One registry of stages, filled from the `catalogen.stages` entry points; the core never imports `tasks`;
the packages keep their layers (docs/architecture.py draws them) and the layout never changes a key."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import BIN, REPO, prompts, write_catalog

import tasks
from catalogen.config import load_config
from catalogen.registry import GROUP, stages
from catalogen.run.plan import prepare

BUILT_INS = ["enhance", "generate", "remove_bg", "style", "upscale", "caption", "score", "renditions"]

# A stage another package ships: it adds each row's prompt in capitals, as text.
SHOUT = '''
import pyarrow as pa
import pyarrow.compute as pc

from catalogen.config import Strict
from catalogen.storage.hashing import column_keys
from catalogen.stage import output_schema

NAME = "shout"
VERSION = 1
POSITION = 35  # after remove_bg, before style
READS = ("prompt",)
PROVIDES = ()
FROM_UPSTREAM = {}
SHARD_ORDER = ()
MAKES_IMAGES = False
PLAN_SCHEMA = pa.schema([("id", pa.string()), ("variant", pa.int32()), ("key", pa.string()), ("prompt", pa.string())])
OUTPUT_SCHEMA = output_schema([pa.field("text", pa.string())], images=False)


class Settings(Strict):
    suffix: str = "!"


def models(cfg):
    return {}


def rules(cfg):
    return {}


def config_faults(cfg):
    return []


def plan(rows, cfg, models):
    prompt = pc.cast(rows.column("prompt"), pa.string())
    keys = column_keys([NAME, VERSION, cfg.shout.suffix], [prompt])
    return pa.table([rows.column("id"), rows.column("variant"), keys, prompt], schema=PLAN_SCHEMA)


def process(planned, ctx):
    n = planned.num_rows
    text = [p.upper() + ctx.config.shout.suffix for p in planned.column("prompt").to_pylist()]
    rows = [{"id": i, "variant": v, "key": k, "text": t, "status": "ok", "error": None, "seconds": 0.0,
             "device": ctx.device.name, "finished_at": None}
            for i, v, k, t in zip(planned.column("id").to_pylist(), planned.column("variant").to_pylist(),
                                  planned.column("key").to_pylist(), text)]
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)  # columns the runner fills (device_seconds, cost) left null
'''


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, timeout=300)


def _python(code: str, *args: str, **env: str) -> str:
    done = _run([sys.executable, "-c", code, *args], **env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle among the modules of `graph`, or [] (a depth-first search that meets a module on its own path)."""
    path: list[str] = []
    finished: set[str] = set()

    def visit(module: str) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in finished or module not in graph:
            return []
        path.append(module)
        for imported in sorted(graph[module]):
            circle = visit(imported)
            if circle:
                return circle
        path.pop()
        finished.add(module)
        return []

    for module in sorted(graph):
        circle = visit(module)
        if circle:
            return circle
    return []


def test_the_core_never_imports_tasks():
    graph = _architecture().import_graph()
    core = [module for module in graph if module.split(".")[0] == "catalogen"]
    assert len(core) > 40  # its subpackages included
    assert [f"{m} -> {d}" for m in core for d in graph[m] if d.split(".")[0] == "tasks"] == []
    imported = _python(
        "import sys, catalogen.cli, catalogen.run.plan, catalogen.config, catalogen.run.results, catalogen.publish.report, "
        "catalogen.publish.export, catalogen.run.inspect, catalogen.models, catalogen.models.rembg\n"
        "print(any(m == 'tasks' or m.startswith('tasks.') for m in sys.modules))"
    )
    assert imported == "False"


def _architecture():
    """docs/architecture.py, which draws the packages and holds their layers (one import scan for both)."""
    spec = importlib.util.spec_from_file_location("architecture", REPO / "docs" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circle_anywhere():
    """catalogen/, flows/ and tasks/: imports inside functions and under TYPE_CHECKING count."""
    graph = _architecture().import_graph()
    assert len(graph) > 60  # every module, subpackages included
    assert _circle(graph) == []


def test_no_module_imports_from_a_higher_layer():
    architecture = _architecture()
    graph = architecture.import_graph()
    upward = [f"{module} -> {imported}" for module, deps in sorted(graph.items()) for imported in sorted(deps)
              if architecture.layer_of(imported) < architecture.layer_of(module)]
    assert upward == []
    assert architecture.layer_of("catalogen.run.plan") < architecture.layer_of("catalogen.stage")


def test_every_catalogen_import_names_a_module_that_exists():
    """A module that moved leaves no import of its old name behind (tests, benchmarks and docs included)."""
    known = set(_architecture().modules())
    stale = []
    for top in ("catalogen", "flows", "tasks", "tests", "benchmarks", "docs", "catalogs"):
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names if a.name.startswith("catalogen.")]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "catalogen":
                    names = [f"catalogen.{a.name}" for a in node.names if a.name != "__version__"]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("catalogen."):
                    names = [node.module]
                else:
                    continue
                stale += [f"{path.relative_to(REPO)}:{node.lineno}: {name}" for name in names if name not in known]
    assert stale == []


def test_the_architecture_picture_is_drawn_from_the_code_now():
    architecture = _architecture()
    assert (REPO / "docs" / "architecture.md").read_text() == architecture.render(), \
        "docs/architecture.md is out of date: run python docs/architecture.py"


# sha256 of each stage's planned keys ("\n"-joined, in plan order), made by a9bb0a3 (before the
# modules moved into subpackages): a key never depends on where the code lives, so old run folders
# resume with nothing recomputed. A stage whose VERSION or key deliberately changes updates its line.
KEYS_OF = {
    ("catalogs/demo_prompts.parquet", "configs/dataset.yaml"): {
        "generate": "f656ad0d6523a07653e1d5d4443268a9148c7e00701693b80b082b31fe7d7bb0",
        "caption": "6491aee5fa9daec46d0a2c28ca9c2b966f175a1b021466a0ea56e58d2e6fcdb4",
    },
    ("catalogs/demo_products.parquet", "configs/products.yaml"): {
        "enhance": "7dceefc27334c2580eeb9384fcf628c41cdca1e0abc710cecd6540716dce8b61",
        "generate": "09b215ec22bbeaae0fc0d6ab09e0a1fbea05262d768972586e36f1a0bc8f1211",
        "remove_bg": "6da04624826211a3fe2fd1c0b119b02639ed56dfe55c8169a8ec611b34140b9a",
        "style": "875f1b83355164ee2a384fb4a01ff261e0611e3c21bf591e4c472a5905cd3ab1",
        "upscale": "c116c18b81dfa54b14a3c4f14f2c3101b1392b91911e2b8ba3e6883db18def45",
        "caption": "acd4e152f68ac444b9ee23e9432fc32974476d3a21326d7f728659c192eca879",
        "renditions": "023c72546ff9796b163b24d74e4db43278b8d01174f52aa22cc54a01db564437",
    },
}


@pytest.mark.parametrize(("catalog", "config"), list(KEYS_OF))
def test_planned_keys_are_those_the_previous_layout_made(catalog, config, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name files (a style image) relative to the project
    expected = KEYS_OF[(catalog, config)]
    cfg = load_config(REPO / config, {"generate.steps": 2, "generate.width": 32, "generate.height": 32,
                                      "stages": list(expected)})
    plan = prepare(REPO / catalog, cfg, tmp_path / "run")
    found = {stage: hashlib.sha256("\n".join(plan.planned[stage].column("key").to_pylist()).encode()).hexdigest()
             for stage in expected}
    assert found == expected


def test_built_in_stages_come_from_the_entry_points_in_pipeline_order():
    registered = {entry.name: entry.value for entry in metadata.entry_points(group=GROUP)}
    assert list(stages()) == BUILT_INS
    assert {name: module.__name__ for name, module in stages().items()} == {n: f"tasks.{n}" for n in BUILT_INS}
    assert registered == {n: f"tasks.{n}" for n in BUILT_INS}
    assert tasks.STAGES is stages()


def _install_shout(root: Path, module: str = SHOUT) -> Path:
    """A package `catalogen-shout` as pip would leave it: its module and a dist-info naming the entry point."""
    info = root / "catalogen_shout-1.0.dist-info"
    info.mkdir(parents=True)
    (root / "catalogen_shout.py").write_text(module)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: catalogen-shout\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\nshout = catalogen_shout\n")
    return root


# Run in a process that sees the package: list the stages, then run shout directly, as conftest's helpers do.
SHOUT_RUN = """
import sys
from pathlib import Path

sys.path.insert(0, "tests")
import pyarrow as pa
from conftest import fast_config, prompts, run_stage

from catalogen.config import config_model
from catalogen.registry import stages

print(list(stages()), config_model().model_fields["shout"].default.suffix)
cfg = fast_config(stages=["shout"], **{"shout.suffix": "?"})
print(run_stage(pa.table(prompts(1)), cfg, Path(sys.argv[1]), "shout").column("text").to_pylist())
"""


def test_a_stage_from_another_package_is_registered(tmp_path):
    site = _install_shout(tmp_path / "site")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    in_order = BUILT_INS[:3] + ["shout"] + BUILT_INS[3:]  # its POSITION 35 puts it after remove_bg
    assert _python(SHOUT_RUN, str(tmp_path / "run"), **env).splitlines() == [
        f"{in_order} !", "['A PHOTO OF OBJECT NUMBER 0?']"
    ]

    catalog = write_catalog(tmp_path / "catalog.parquet", prompts(2))
    validate = [str(BIN / "catalogen"), "validate", str(catalog), "--set", "stages=[generate,shout]"]
    accepted = _run(validate, **env)
    assert accepted.returncode == 0, accepted.stderr
    assert "through generate -> shout" in accepted.stdout
    misspelt = _run([*validate, "--set", "shout.sufix=?"], **env)
    assert misspelt.returncode == 1 and "did you mean 'shout.suffix'" in misspelt.stderr


@pytest.mark.parametrize(("module", "fault"), [
    ("import no_such_library\n", "failed to import: No module named 'no_such_library'"),
    (SHOUT.replace('NAME = "shout"', 'NAME = "yell"'), "declares NAME = 'yell'; the two names must match"),
])
def test_a_broken_stage_package_is_named(tmp_path, module: str, fault: str):
    env = {"PYTHONPATH": str(_install_shout(tmp_path / "site", module))}
    done = _run([sys.executable, "-c", "from catalogen.registry import stages; stages()"], **env)
    assert done.returncode == 1
    assert f"stage 'shout' (catalogen_shout, registered by catalogen-shout) {fault}" in done.stderr
