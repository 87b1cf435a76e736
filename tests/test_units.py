"""The small pure pieces: configuration, batching, leases, atomic writes, PNG parameters."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import held_in_another_process

from catalogen.run.batching import AdaptiveBatcher
from catalogen.config import ConfigError, load_config, parse_override
from catalogen.run.devices import Device, lease
from catalogen.media.pngmeta import format_parameters, parse_parameters
from catalogen.storage.store import RunStore, safe_name, write_atomic

# --- configuration ---------------------------------------------------------------------------------


def test_yaml_then_overrides(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("profile: tiny\nseed: 3\ngenerate:\n  steps: 12\n  scheduler: ddim\n")
    cfg = load_config(path, dict([parse_override("generate.steps=30"), parse_override("rows_per_shard=8")]))
    assert (cfg.seed, cfg.generate.steps, cfg.generate.scheduler, cfg.rows_per_shard) == (3, 30, "ddim", 8)


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("generate:\n  steps: 0\n", {}, "generate.steps"),
        ("generate:\n  stepz: 10\n", {}, "generate.stepz"),
        ("profile: huge\n", {}, "profile: Input should be 'tiny'"),
        ("", {"generate.scheduler": "magic"}, "generate.scheduler"),
        ("", {"device": "tpu"}, "device must be"),
        ("[1, 2]\n", {}, "mapping"),
        ("a: [\n", {}, "not valid YAML"),
        ("generate:\n  scheduler: k_magic\n", {}, "unknown scheduler 'k_magic'"),
        ("stages: [generate, paint]\n", {}, "unknown stage"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, text, overrides, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_example_config_is_valid_and_bad_override_refused():
    assert load_config("configs/run.example.yaml").generate.steps == 25
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("no-equals-sign")


# --- batching ---------------------------------------------------------------------------------------


def test_out_of_memory_halves_the_batch_and_keeps_the_size():
    calls = []

    def fn(batch, size):
        calls.append((len(batch), size))
        if size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return [x * 10 for x in batch]

    batcher = AdaptiveBatcher(fn, size=8)
    outcomes = [o for batch in batcher.run(list(range(7))) for o in batch]
    assert [o.result for o in outcomes] == [x * 10 for x in range(7)]
    # 7 items at size 8 fail, at 4 fail, then pairs; the last item alone, still at size 2.
    assert calls == [(7, 8), (4, 4), (2, 2), (2, 2), (2, 2), (1, 2)]
    assert batcher.size == 2 and {o.batch_size for o in outcomes} == {2}


def test_a_bad_item_fails_alone():
    def fn(batch, size):
        if 3 in batch:
            raise ValueError("three is bad")
        return [x + 1 for x in batch]

    outcomes = [o for batch in AdaptiveBatcher(fn, size=4).run(list(range(6))) for o in batch]
    assert [o.result for o in outcomes] == [1, 2, 3, None, 5, 6]
    assert isinstance(outcomes[3].error, ValueError)


def test_out_of_memory_at_batch_size_one_is_a_row_failure():
    def fn(batch, size):
        raise torch.OutOfMemoryError("out of memory")

    outcomes = [o for batch in AdaptiveBatcher(fn, size=2).run([1, 2]) for o in batch]
    assert all(isinstance(o.error, torch.OutOfMemoryError) for o in outcomes)


# --- leases -----------------------------------------------------------------------------------------

CPU = Device("cpu", "test-device-a")


def test_a_lease_is_exclusive_across_threads():
    inside, overlaps = [], []

    def work():
        with lease([CPU], poll_seconds=0.005, timeout=30):
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.02)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1] * 5


def test_leases_spread_over_devices_and_time_out():
    a, b = Device("cuda:0", "test-gpu-0"), Device("cuda:1", "test-gpu-1")
    with lease([a, b]) as first, lease([a, b]) as second:
        assert {first, second} == {a, b}
        with pytest.raises(TimeoutError, match="no device free"):
            with lease([a, b], timeout=0.1):
                pass


def test_a_lease_is_released_when_its_block_raises():
    device = Device("cuda:0", "test-gpu-raises")
    with pytest.raises(RuntimeError, match="boom"):
        with lease([device], timeout=5):
            raise RuntimeError("boom")
    with lease([device], timeout=1) as got:  # fails fast (TimeoutError) if the first lease leaked
        assert got == device


def test_waiting_for_a_lease_reports_its_holder_and_times_out():
    device = Device("cuda:0", "test-gpu-waited")
    heard = []
    with lease([device], timeout=5):
        with pytest.raises(TimeoutError, match=rf"held by pid {os.getpid()} thread"):
            with lease([device], timeout=0.3, on_wait=lambda *a: heard.append(a), report_every=0.05):
                pass
    assert heard and heard[0][0] == "cuda:0" and f"pid {os.getpid()}" in heard[0][1]


def test_a_lease_dies_with_its_process():
    device = Device("cuda:0", "test-gpu-killed")
    with held_in_another_process("from catalogen.run.devices import Device, lease",
                                 f"lease([Device('cuda:0', '{device.physical_id}')])"):
        with pytest.raises(TimeoutError):
            with lease([device], timeout=0.2):
                pass
    # the holder was killed (SIGKILL: no cleanup code ran)
    with lease([device], timeout=5) as got:
        assert got == device


# --- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("on_limit", ["error", "killed"])
def test_a_part_write_that_fails_halfway_counts_for_nothing(tmp_path: Path, on_limit: str):
    # A real short write: the file-size limit stops the writer mid-file, as a full disk would.
    # "error": write() fails with EFBIG; "killed": SIGXFSZ ends the process mid-write.
    import textwrap

    out = tmp_path / "run"
    code = textwrap.dedent(f"""
        import resource, signal, sys
        import pyarrow as pa
        from catalogen.storage.store import RunStore
        # CPython ignores SIGXFSZ (write() then fails with EFBIG); the default action kills the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN if {on_limit!r} == "error" else signal.SIG_DFL)
        table = pa.table({{"id": [f"row-{{i}}-" + "x" * 40 for i in range(200_000)]}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
        try:
            RunStore({str(out)!r}).write_part("generate", "big", table)
        except OSError as exc:
            print("failed", exc.errno)
            sys.exit(7)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == (7 if on_limit == "error" else -25), done.stderr  # 25: SIGXFSZ
    store = RunStore(out)
    assert store.part_files("generate") == []  # nothing half-written counts as done
    leftovers = [p for p in out.rglob("*") if p.is_file()]
    assert all(store.tmp_dir in p.parents for p in leftovers), leftovers  # debris only where it is swept
    store.clear_leftovers()
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path):
    target = tmp_path / "sub" / "file.bin"
    write_atomic(target, b"first")

    with pytest.raises(TypeError):
        write_atomic(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_image_names_cannot_escape_the_run_folder():
    store = RunStore("/runs/x")
    path = store.image_path("generate", "../../etc/passwd", 0, "ab" * 32)
    assert ".." not in path and path.startswith("images/generate/") and path.count("/") == 3
    assert safe_name("/") == "row" and safe_name("é/ü x") == "x"


def test_every_id_owns_its_image_file():
    # Ids that sanitise alike, differ only in case, are non-ASCII or share a long prefix.
    ids = ["a/b", "a_b", "a b", "a.b", "A_B", "é", "ü", "x" * 80 + "1", "x" * 80 + "2", "", " "]
    store = RunStore("/runs/x")
    paths = [store.image_path("generate", rid, 0, "cd" * 32) for rid in ids]
    # Distinct file names, not only distinct folders: even in one folder, on a case-insensitive filesystem.
    assert len({p.rsplit("/", 1)[1].lower() for p in paths}) == len(ids)
    assert store.image_path("generate", "a", 0, "cd" * 32) != store.image_path("generate", "a", 1, "cd" * 32)


# --- PNG parameters ---------------------------------------------------------------------------------


def test_parameters_format_matches_a1111():
    text = format_parameters(
        "a cat", "blurry", steps=20, scheduler="euler_a", guidance_scale=7.0, seed=42, width=512, height=768,
        model="runwayml/sd, v1", model_hash="abcdef1234",
    )
    assert text == (
        "a cat\nNegative prompt: blurry\n"
        'Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 512x768, Model hash: abcdef1234, Model: "runwayml/sd, v1"'
    )
    parsed = parse_parameters(text)
    assert parsed["model"] == "runwayml/sd, v1" and parsed["scheduler"] == "euler_a" and parsed["height"] == 768


def test_parameters_written_by_other_tools_parse():
    # As A1111 writes them, with settings catalogen does not know and no negative prompt.
    text = "masterpiece, (castle:1.3)\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 7, Size: 1024x1024, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.4, Hires upscale: 2"
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "masterpiece, (castle:1.3)" and parsed["negative_prompt"] == ""
    assert parsed["scheduler"] == "dpm++_2m_karras" and parsed["Hires upscale"] == "2"


# --- prompt emphasis --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a cat", [("a cat", 1.0)]),
        ("a (cat:1.5) here", [("a ", 1.0), ("cat", 1.5), (" here", 1.0)]),
        ("((cat))", [("cat", pytest.approx(1.21))]),
        ("[dog] x", [("dog", pytest.approx(1 / 1.1)), (" x", 1.0)]),
        ("(a (b:2):0.5)", [("a ", 0.5), ("b", 1.0)]),
        (r"\(literal\) text", [("(literal) text", 1.0)]),
        ("ratio 16:9, done)", [("ratio 16:9, done)", 1.0)]),
        ("open (ended", [("open ", 1.0), ("ended", pytest.approx(1.1))]),
        ("", [("", 1.0)]),
    ],
)
def test_a1111_emphasis_parses(text, expected):
    from catalogen.models.prompts import parse_weights

    assert parse_weights(text) == expected


# --- the model cache --------------------------------------------------------------------------------


def test_models_past_the_budget_release_the_least_recently_used():
    from catalogen.models import loading as models

    models.clear_cache()
    made = []

    def build(name):
        def make():
            made.append(name)
            return torch.nn.Linear(256, 256)  # 257 KB of float32 parameters
        return make

    budget_gb = 0.6 / 1024  # room for two such models, not three
    for name in ("a", "b", "a", "c", "a", "b"):
        models.cached(("test", name, "rev", "cpu", "float32"), "cpu", build(name), budget_gb)
    # a, b loaded; a reused; c evicts b (least recently used); a reused; b loaded again, evicting c.
    assert made == ["a", "b", "c", "b"]
    events = [(e["event"], e["repo"]) for e in models.load_events()]
    assert events == [("load", "a"), ("load", "b"), ("release", "b"), ("load", "c"), ("release", "c"), ("load", "b")]
    assert models.load_count() == 4
    models.clear_cache()
