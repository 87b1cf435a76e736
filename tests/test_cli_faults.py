"""Refused commands leave the filesystem as it was and say why in one line; usage errors exit 2;
a configuration error names the flag or --set it came from; a folder URL that is not storage is
refused before any request, and a catalog URL on a silent server ends at its deadline."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
from conftest import BIN, cli_env
from test_degenerate import ROWS, write_run
from typer.testing import CliRunner

from catalogen.cli import app


def tree(*roots: Path) -> set[str]:
    """Every path under each root (the root's own entries only for `/`)."""
    found = set()
    for root in roots:
        if root == Path("/"):
            found |= {str(p) for p in root.iterdir()}
            continue
        for folder, dirs, files in os.walk(root):
            found |= {os.path.join(folder, name) for name in dirs + files}
    return found


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture()
def places(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # where `--out ""` would have put its lock
    run = write_run(tmp_path / "run", ROWS)
    (run / "stages" / "generate").mkdir(parents=True)
    (tmp_path / "a-file").write_text("not a folder")
    return {"run": run, "cwd": cwd, "tmp": tmp_path}


@pytest.mark.parametrize(("out", "message"), [
    ("/", "--out / is the filesystem root"),
    ("{run}", "--out {run} is inside the run folder {run}"),
    ("{run}/images", "--out {run}/images is inside the run folder {run}"),
    ("{run}/stages/generate", "--out {run}/stages/generate is inside the run folder {run}"),
    ("{tmp}/a-file", "--out {tmp}/a-file is a file, not a folder"),
    ("{tmp}/a-file/sub", "--out {tmp}/a-file/sub is under {tmp}/a-file, a file, not a folder"),
    ("/proc/catalogen-export", "--out /proc/catalogen-export: cannot create it (No such file or directory)"),
])
def test_an_export_folder_that_cannot_be_one_is_refused_before_anything_is_created(places, out, message):
    out = out.format(**places)
    before = tree(places["tmp"], Path("/"))
    result = invoke("export", str(places["run"]), "--format", "hf", "--out", out)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {message.format(**places)}")
    assert result.output.count("\n") == 1  # one line: no traceback, no progress bar
    assert tree(places["tmp"], Path("/")) == before


def test_an_empty_export_folder_is_a_usage_error(places):
    before = tree(places["tmp"])
    result = invoke("export", str(places["run"]), "--format", "hf", "--out", "")
    assert result.exit_code == 2 and "is empty: name the export folder" in result.output
    assert tree(places["tmp"]) == before


@pytest.mark.parametrize("command", ["status", "verify", "clean", "report"])
def test_a_folder_without_run_json_is_not_a_run(tmp_path: Path, command: str):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.png").write_bytes(b"not really")
    result = invoke(command, str(folder))
    assert result.exit_code == 1
    assert result.output == f"error: {folder} is not a catalogen run folder (no run.json)\n"
    assert tree(tmp_path) == {str(folder), str(folder / "holiday.png")}


@pytest.mark.parametrize("command", ["status", "verify", "clean", "report", "export"])
def test_a_missing_run_folder_or_a_file_is_one_line_as_well(tmp_path: Path, monkeypatch, command: str):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    extra = ["--format", "hf", "--out", "exported"] if command == "export" else []
    for given, why in (("gone", "does not exist"), ("a-file", "is not a folder")):
        result = invoke(command, given, *extra)
        assert result.exit_code == 1, result.output
        assert result.output == f"error: {tmp_path / given} {why}\n"  # the folder named absolute, no usage box
    assert tree(tmp_path) == {str(tmp_path / "a-file")}


@pytest.mark.parametrize(("option", "shown"), [
    (["--format", "tfrecord"], "'tfrecord' is not one of hf, webdataset, imagefolder"),
    (["--format", "hf", "--where", "quality"], "--where 'quality' is not COLUMN<op>VALUE"),
    (["--format", "hf", "--split", "train=0.5"], "the fractions add up to 0.5, not 1"),
])
def test_malformed_export_options_are_usage_errors(places, option, shown):
    out = places["tmp"] / "export"
    result = invoke("export", str(places["run"]), "--out", str(out), *option)
    assert result.exit_code == 2
    assert shown in " ".join(result.output.replace("│", " ").split())
    assert not out.exists()


def test_the_benchmark_format_is_not_offered():
    result = invoke("export", "--help")
    assert "imagefolder" in result.output and "dummy" not in result.output
    assert invoke("export", ".", "--format", "dummy", "--out", "x").exit_code == 2


def test_no_progress_bar_is_printed_before_an_export_error(places):
    result = invoke("export", str(places["run"]), "--format", "hf", "--out", str(places["tmp"] / "x"),
                    "--where", "clip>=3")
    assert result.exit_code == 1 and "has no column 'clip'" in result.output
    assert "export hf" not in result.output and result.output.count("\n") == 1


def test_limit_and_sample_together_are_a_usage_error(tmp_path: Path):
    out = tmp_path / "out"
    result = invoke("run", "catalogs/demo_prompts.parquet", "--limit", "2", "--sample", "3", "--out", str(out))
    assert result.exit_code == 2 and "--limit" in result.output and "--sample" in result.output
    assert not out.exists()


@pytest.mark.parametrize(("args", "origin"), [
    (["validate", "catalogs/demo_prompts.parquet", "--set", "stages=[generate,generate]"],
     "stages: a stage is listed twice in ['generate', 'generate'] (from --set stages=[generate,generate])"),
    (["run", "catalogs/demo_prompts.parquet", "--stages", "generate,foo", "--out", "{tmp}/out"],
     "stages: unknown stage 'foo'. Known stages: enhance, generate, remove_bg, style, upscale, caption, "
     "score, renditions (from --stages generate,foo)"),
    # A misspelt stage gets the same did-you-mean as a misspelt setting, from a flag or a file.
    (["run", "catalogs/demo_prompts.parquet", "--stages", "generate,captions", "--out", "{tmp}/out"],
     "stages: unknown stage 'captions'; did you mean 'caption'? Known stages: enhance, generate, remove_bg, style, "
     "upscale, caption, score, renditions (from --stages generate,captions)"),
    (["validate", "catalogs/demo_prompts.parquet", "--config", "{tmp}/stages.yaml"],
     "stages: unknown stage 'captions'; did you mean 'caption'? Known stages: enhance, generate, remove_bg, style, "
     "upscale, caption, score, renditions (from {tmp}/stages.yaml)"),
])
def test_a_bad_stage_list_names_the_flag_it_came_from(tmp_path: Path, args: list[str], origin: str):
    (tmp_path / "stages.yaml").write_text("stages: [captions]\n")
    result = invoke(*(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 1 and f"  {origin.format(tmp=tmp_path)}\n" in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_a_run_folder_that_cannot_be_one_is_one_line(tmp_path: Path, where: str):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = {"file": blocker, "under-file": blocker / "sub", "proc": Path("/proc/catalogen-test")}[where]
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["run", "catalogs/demo_prompts.parquet", "--out", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], result.output
    assert sorted(tmp_path.rglob("*")) == before and blocker.read_text() == "not a folder"


@contextmanager
def listening(hold: bool) -> Iterator[SimpleNamespace]:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers: `hold` keeps each one
    open (a silent server), else closes it at once (a request refused quickly, only counted)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    seen: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            seen.append(connection)
            if not hold:
                connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(port=server.getsockname()[1], connections=seen)
    finally:
        stop.set()
        thread.join()
        for connection in seen:
            connection.close()
        server.close()


STORAGE_HINT = "give a path, or a file://, s3://, gs:// or az:// URL"


@pytest.mark.parametrize(("args", "line"), [
    (["run", "catalogs/demo_prompts.parquet", "--out", "http://{host}/run"],
     "--out http://{host}/run: http:// is not storage a folder can live in; " + STORAGE_HINT),
    (["run", "catalogs/demo_prompts.parquet", "--out", "ftp://{host}/run", "--dry-run"],
     "--out ftp://{host}/run: ftp:// is not storage a folder can live in; " + STORAGE_HINT),
    (["run", "catalogs/demo_prompts.parquet", "--out", "s3://"], "--out s3:// names no bucket: give s3://BUCKET/PATH"),
    (["run", "catalogs/demo_prompts.parquet", "--out", "s3://", "--dry-run"],
     "--out s3:// names no bucket: give s3://BUCKET/PATH"),
    (["run", "catalogs/demo_prompts.parquet", "--out", "s3:///run"], "--out s3:///run names no bucket: give s3://BUCKET/PATH"),
    (["run", "catalogs/demo_prompts.parquet", "--out", "file://otherhost{tmp}/run"],
     "--out file://otherhost{tmp}/run names the host otherhost: a file:// URL reaches this machine's files only "
     "(file:///PATH or file://localhost/PATH)"),
    (["validate", "s3://"], "s3:// names no bucket: give s3://BUCKET/PATH"),
    (["status", "http://{host}/run"], "RUN http://{host}/run: http:// is not storage a folder can live in; " + STORAGE_HINT),
    (["verify", "s3://"], "RUN s3:// names no bucket: give s3://BUCKET/PATH"),
    (["clean", "https://{host}/run"], "RUN https://{host}/run: https:// is not storage a folder can live in; " + STORAGE_HINT),
    (["report", "memory://run"], "RUN memory://run: memory:// is not storage a folder can live in; " + STORAGE_HINT),
    (["export", "s3:///run", "--format", "hf", "--out", "{tmp}/exp"], "RUN s3:///run names no bucket: give s3://BUCKET/PATH"),
    (["export", "{run}", "--format", "hf", "--out", "http://{host}/exp"],
     "--out http://{host}/exp: http:// is not storage a folder can live in; " + STORAGE_HINT),
    (["export", "{run}", "--format", "hf", "--out", "s3://catalogen-test/exp"],
     "--out s3://catalogen-test/exp: an export is written to a local folder (each shard is renamed into place, "
     "which a bucket cannot do); export to a path, then copy that folder to s3://catalogen-test/exp"),
])
def test_a_folder_url_that_cannot_be_one_is_one_line_before_any_request(places, monkeypatch, args, line):
    with listening(hold=False) as server:
        host = f"127.0.0.1:{server.port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}")  # any bucket request would arrive here too
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
        before = tree(places["tmp"])
        result = invoke(*(a.format(host=host, **places) for a in args))
        time.sleep(0.2)  # a connection made at the end would be accepted by now
        assert result.exit_code == 1, result.output
        assert result.output == f"error: {line.format(host=host, **places)}\n"
        assert server.connections == []
    assert tree(places["tmp"]) == before  # nothing made, in the working folder (./s3:, ./http:) either


def test_a_file_url_of_this_machine_is_its_path(places):
    out = places["tmp"] / "exp"
    result = invoke("export", f"file://{places['run']}", "--format", "imagefolder", "--include-degenerate",
                    "--out", f"file://localhost{out}")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"manifest: {out}/manifest.json"
    assert (out / "manifest.json").is_file()
    assert list(places["cwd"].iterdir()) == []  # not <cwd>/localhost/…


@pytest.mark.timeout(180)
def test_a_catalog_url_on_a_silent_server_is_one_line_after_its_deadline(tmp_path: Path):
    with listening(hold=True) as server:
        url = f"http://127.0.0.1:{server.port}/catalog.parquet"
        env = {**cli_env(), "CATALOGEN_CATALOG_TIMEOUT_S": "2"}
        result = subprocess.run([str(BIN / "catalogen"), "validate", url], env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=150)
        assert len(server.connections) >= 1  # it asked, and the deadline (not a refusal) ended the wait
    assert result.returncode == 1
    assert result.stderr == (f"error: {url}: no complete answer within 2 s (give a slow server longer with "
                             "CATALOGEN_CATALOG_TIMEOUT_S=SECONDS)\n")
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_a_run_folder_given_outside_the_cli_is_held_to_the_same_schemes():
    """A deployment's `out` parameter reaches RunStore without the CLI's checks."""
    from catalogen.storage.locations import LocationError
    from catalogen.storage.store import RunStore

    with pytest.raises(LocationError) as info:
        RunStore("http://127.0.0.1:9/run")
    assert str(info.value) == "run folder http://127.0.0.1:9/run: http:// is not storage a folder can live in; " + STORAGE_HINT
    assert str(RunStore("file://localhost/srv/run").root) == "/srv/run"
