"""Run folders and catalogs in a bucket of a real S3-compatible server (moto's, on 127.0.0.1, through
s3fs), driven through the CLI as users do: the same bytes as on a local disk (here through a Dask
cluster of 2 worker processes), a SIGKILLed run resumed, a second run refused, the folder's
commands and an export from the bucket read back, and the credentials in no output."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from typing import Iterator

import pandas as pd
import pytest
from conftest import BIN, REPO, cli_env

pytestmark = pytest.mark.slow

BUCKET = "catalogen-test"
SECRET = "s3cr3t-Value-That-Must-Never-Be-Printed"
DEMO = ["--config", "configs/dataset.yaml", "--limit", "6", "--rows-per-shard", "1",
        "--set", "generate.width=32", "--set", "generate.height=32", "--set", "generate.steps=2"]
CATALOG = "catalogs/demo_prompts.parquet"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on a free port of 127.0.0.1, with one bucket; the environment that reaches it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "catalogen-test-key",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir(BUCKET)
    fs.put_file(str(REPO / CATALOG), f"{BUCKET}/catalogs/demo_prompts.parquet")
    try:
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def bucket_fs():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def catalogen(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "catalogen"), *args], env=cli_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def start(catalog: str, out: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "catalogen"), "run", catalog, *DEMO, "--out", out, *args], env=cli_env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finished(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-4000:]
    assert "6 rows: 6 ok" in stdout
    return stdout, stderr


def made(results: str) -> pd.DataFrame:
    """What a run made, row by row: every hash, key, path and caption."""
    df = pd.read_parquet(results)
    columns = sorted(c for c in df.columns if c.endswith(("sha256", "_key", "_path")) or c == "caption_caption")
    return df[["id", "variant", "status", *columns]].sort_values(["id", "variant"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory, s3) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("disk") / "out"
    finished(start(CATALOG, str(out)))
    return made(str(out / "results.parquet"))


@pytest.mark.timeout(600)
def test_a_run_in_a_bucket_equals_the_run_on_disk_and_every_folder_command_works_there(on_disk, s3, tmp_path):
    url = f"s3://{BUCKET}/runs/dask"
    stdout, stderr = finished(start(f"s3://{BUCKET}/catalogs/demo_prompts.parquet", url,
                                    "--runner", "dask", "--dask-workers", "2"))
    pd.testing.assert_frame_equal(made(f"{url}/results.parquet"), on_disk)
    fs = bucket_fs()
    info = json.loads(fs.cat_file(f"{BUCKET}/runs/dask/run.json"))
    assert info["catalog"]["path"] == f"s3://{BUCKET}/catalogs/demo_prompts.parquet"
    assert not fs.exists(f"{BUCKET}/runs/dask/.lock")  # released at the end
    assert not fs.exists(f"{BUCKET}/runs/dask/work")  # shard inputs removed once absorbed
    # every location printed is a URL to paste (a pathlib join printed `results: s3:/catalogen-test/…`)
    assert stdout.splitlines()[-2:] == [f"results: {url}/results.parquet", f"report: {url}/report.html"]
    assert fs.exists(f"{BUCKET}/runs/dask/report.html")
    report = catalogen("report", url)
    assert report.returncode == 0 and report.stdout == f"{url}/report.html\n", report.stderr

    status = catalogen("status", url)
    assert status.returncode == 0, status.stderr
    assert "generate" in status.stdout and "6" in status.stdout
    assert status.stdout.lstrip().startswith(f"{url} (")  # the table's title
    assert all(f"--out {url} " in line for line in status.stdout.splitlines() if "--out" in line)

    verify = catalogen("verify", url)
    assert verify.returncode == 0, verify.stderr
    assert "every image matches" in verify.stdout

    # an image replaced in the bucket is found and marked failed, with the command that redoes it
    first = made(f"{url}/results.parquet")["generate_image_path"][0]
    fs.pipe_file(f"{BUCKET}/runs/dask/{first}", b"not the image")
    verify = catalogen("verify", url)
    assert verify.returncode == 3 and "1 image(s) missing or changed" in verify.stdout
    hint = verify.stdout.split("redo them with: ")[1].splitlines()[0]
    assert hint.endswith(f"--out {url} --limit 6 --retry-failed")  # the trial's rows, not the whole catalog
    program, *args = shlex.split(hint)
    assert program == "catalogen"
    redo = catalogen(*args)  # exactly the printed command
    assert redo.returncode == 0, redo.stderr
    pd.testing.assert_frame_equal(made(f"{url}/results.parquet"), on_disk)

    # an orphan image is listed by clean, and removed with --yes
    fs.pipe_file(f"{BUCKET}/runs/dask/images/generate/zz/orphan.png", b"x")
    listed = catalogen("clean", url)
    assert listed.returncode == 0 and listed.stdout.splitlines()[0] == "images/generate/zz/orphan.png"
    assert catalogen("clean", url, "--yes").returncode == 0
    assert not fs.exists(f"{BUCKET}/runs/dask/images/generate/zz/orphan.png")
    assert catalogen("verify", url).returncode == 0

    # an export into a bucket is refused in one line, before any work: nothing in the bucket, no ./s3:/…
    refused = catalogen("export", url, "--format", "webdataset", "--out", f"s3://{BUCKET}/exports/wds")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == (f"error: --out s3://{BUCKET}/exports/wds: an export is written to a local folder (each "
                              "shard is renamed into place, which a bucket cannot do); export to a path, then copy "
                              f"that folder to s3://{BUCKET}/exports/wds\n")
    assert not fs.exists(f"{BUCKET}/exports") and not (REPO / "s3:").exists()

    # an export from the bucket, read back by webdataset's own reader
    import webdataset as wds

    export = catalogen("export", url, "--format", "webdataset", "--include-degenerate", "--out", str(tmp_path / "wds"))
    assert export.returncode == 0, export.stderr
    assert export.stdout.splitlines()[-1] == f"manifest: {tmp_path / 'wds' / 'manifest.json'}"
    shards = sorted(str(p) for p in (tmp_path / "wds").rglob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(samples) == 6 and all("png" in s and "txt" in s for s in samples)

    # the credentials appear in no output and no file of the folder
    outputs = stdout + stderr + status.stdout + verify.stdout + redo.stdout + redo.stderr + export.stdout
    assert SECRET not in outputs and s3["AWS_ACCESS_KEY_ID"] not in outputs
    for name in fs.find(f"{BUCKET}/runs/dask"):
        assert SECRET.encode() not in fs.cat_file(name), name


@pytest.mark.timeout(600)
def test_a_sigkilled_run_in_a_bucket_resumes_and_a_second_run_is_refused(on_disk, s3):
    url = f"s3://{BUCKET}/runs/killed"
    fs = bucket_fs()
    proc = start(CATALOG, url)
    deadline = time.monotonic() + 240
    while not fs.glob(f"{BUCKET}/runs/killed/stages/generate/part-*.parquet"):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.3)

    # while it runs, a second run into the same folder is refused, naming the holder
    second = catalogen("run", CATALOG, *DEMO, "--out", url)
    assert second.returncode == 1
    assert "is in use by another run (pid" in second.stderr and "Traceback" not in second.stderr

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert fs.exists(f"{BUCKET}/runs/killed/.lock")  # left behind: its holder is gone

    # the same command again takes the dead holder's lease over at once and finishes the rest
    finished(start(CATALOG, url))
    pd.testing.assert_frame_equal(made(f"{url}/results.parquet"), on_disk)
    assert not fs.exists(f"{BUCKET}/runs/killed/.lock")


def test_the_lease_refuses_a_live_holder_takes_an_expired_one_and_tells_a_holder_it_lost(s3):
    from upath import UPath

    from catalogen import lease

    lock = UPath(f"s3://{BUCKET}/leases/one/.lock", use_listings_cache=False)
    fs = bucket_fs()
    fs.pipe_file(lock.path, json.dumps({"holder": "pid 1 on elsewhere", "host": "elsewhere", "pid": 1,
                                        "expires": time.time() + 600}).encode())
    with pytest.raises(lease.LeaseBusy, match="pid 1 on elsewhere"):
        lease.take(lock)
    assert lease.holder(lock) == "pid 1 on elsewhere"

    fs.pipe_file(lock.path, json.dumps({"holder": "gone", "host": "elsewhere", "pid": 1,
                                        "expires": time.time() - 1}).encode())
    assert lease.holder(lock) is None
    lost = []
    with lease.hold(lock, ttl=0.8, on_lost=lambda: lost.append(True)):
        assert json.loads(fs.cat_file(lock.path))["pid"] == os.getpid()
        time.sleep(0.5)  # renewed in the background (every ttl / 4)
        assert json.loads(fs.cat_file(lock.path))["expires"] > time.time()
        fs.pipe_file(lock.path, b'{"holder": "a run that took it over"}')  # another writer replaces it
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.1)
    assert lost == [True]
    assert fs.cat_file(lock.path) == b'{"holder": "a run that took it over"}'  # not deleted: not ours

    fs.rm_file(lock.path)
    with lease.hold(lock):
        pass
    assert not fs.exists(lock.path)


def test_a_bucket_that_does_not_exist_is_one_line_and_nothing_is_made(s3):
    result = catalogen("run", CATALOG, *DEMO, "--out", "s3://no-such-bucket-here/run")
    assert result.returncode == 1
    assert "the bucket s3://no-such-bucket-here does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not bucket_fs().exists("no-such-bucket-here")


def test_a_bucket_root_may_hold_a_run_folder(s3):
    """A run folder needs a bucket, and the bucket's root is one (`s3://` and `s3:///x` are refused:
    tests/test_cli_faults.py). A dry run plans into it and writes nothing."""
    fs = bucket_fs()
    before = sorted(fs.find(BUCKET))
    result = catalogen("run", CATALOG, *DEMO, "--dry-run", "--out", f"s3://{BUCKET}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"dry run for s3://{BUCKET}/ (a new folder)"), result.stdout
    assert sorted(fs.find(BUCKET)) == before
