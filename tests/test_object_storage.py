"""Run folders and catalogs in a bucket of a real S3-compatible server (moto's, on 127.0.0.1, through
s3fs), driven through the CLI as users do: the same bytes as on a local disk (here through a Dask
cluster of 2 worker processes), a SIGKILLed run resumed, a second run refused, the folder's
commands and an export from the bucket read back, and the credentials in no output; an endpoint
that goes silent (a proxy that holds every byte) neither lets a run that lost its lease overwrite
the run that took the folder over, nor keeps a stopped run alive; lease objects that cannot be read
count as held."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pandas as pd
import pytest
from conftest import BIN, REPO, cli_env
from typer.testing import CliRunner

from catalogen.cli import app

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

    # Its request lines (werkzeug's, coloured) would land in what in-process CLI calls print.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
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


@pytest.mark.timeout(900)
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
    catalog = f"s3://{BUCKET}/catalogs/demo_prompts.parquet"
    hints = [line for line in status.stdout.splitlines() if "--out" in line]
    assert hints[0] == f"make the rest of the catalog in this folder: catalogen run {catalog} --out {url}", status.stdout
    assert hints[1].startswith(f"repeat the trial in a new folder, with these settings: catalogen run {catalog} "
                               f"--out {url}-trial --limit 6 --set "), status.stdout
    assert len(hints) == 2

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
    assert listed.returncode == 0 and listed.stdout.splitlines()[0] == f"{url}/images/generate/zz/orphan.png"
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


@pytest.mark.timeout(900)
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

    from catalogen.storage import lease

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


class PausingProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server. Paused, it is an endpoint gone silent: it
    accepts connections and reads requests but forwards nothing either way; on resume it delivers
    what it held, also requests whose client gave up meanwhile (as a network may)."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.open = threading.Event()
        self.open.set()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self.open.wait()
        try:
            upstream = socket.create_connection(self.target)
        except OSError:  # the server stopped
            client.close()
            return
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.open.wait()
                dst.sendall(data)
            self.open.wait()
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (src, dst):
                sock.close()

    def pause(self) -> None:
        self.open.clear()

    def resume(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.open.set()
        self.server.close()


@pytest.fixture
def proxy(s3) -> Iterator[PausingProxy]:
    running = PausingProxy(s3["AWS_ENDPOINT_URL"])
    yield running
    running.close()


SLOW = ["--stages", "generate", "--set", "generate.steps=30"]  # shards that take a while, so a pause finds some in flight


def start_logged(out: str, log: Path, *args: str, **env: str) -> subprocess.Popen:
    """A run into `out` whose stdout and stderr go to files (read while it runs)."""
    return subprocess.Popen([str(BIN / "catalogen"), "run", CATALOG, *DEMO, *SLOW, "--out", out, *args],
                            env={**cli_env(), "PREFECT_LOGGING_LEVEL": "INFO", **env}, cwd=REPO,
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"),
                            text=True, start_new_session=True)


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def folder_bytes(prefix: str) -> dict[str, bytes]:
    """Every object of a run folder (the lease aside) and its bytes."""
    fs = bucket_fs()
    return {name: fs.cat_file(name) for name in fs.find(prefix) if not name.endswith("/.lock")}


@pytest.mark.timeout(900)
def test_a_run_that_lost_its_lease_writes_nothing_over_the_run_that_took_the_folder_over(s3, proxy, tmp_path):
    url, prefix = f"s3://{BUCKET}/runs/taken-over", f"{BUCKET}/runs/taken-over"
    fs = bucket_fs()
    # run A's lease: renewed every 2.5 s, it stops writing 7.5 s after its last renewal, expires after 10 s
    first = start_logged(url, tmp_path / "a", AWS_ENDPOINT_URL=proxy.url, CATALOGEN_LEASE_S="10")
    wait_until(lambda: fs.glob(f"{prefix}/stages/generate/part-*.parquet") or first.poll() is not None, 420,
               "run A's first part")
    assert first.poll() is None, (tmp_path / "a.err").read_text()[-3000:]
    proxy.pause()  # run A's endpoint goes silent, its requests in flight held
    a_err = tmp_path / "a.err"
    wait_until(lambda: "lost the lease on" in a_err.read_text(), 60, "run A to say it lost the lease")
    lease = json.loads(fs.cat_file(f"{prefix}/.lock"))
    wait_until(lambda: time.time() > lease["expires"] + 0.5, 10, "run A's lease to expire")

    # straight to the server, with device leases of its own (as on another machine): takes the folder over
    second = start_logged(url, tmp_path / "b", CATALOGEN_LOCK_DIR=str(tmp_path / "b-devices"))
    assert second.wait(timeout=420) == 0, (tmp_path / "b.err").read_text()[-3000:]
    assert "6 rows: 6 ok" in (tmp_path / "b.out").read_text()
    taken = folder_bytes(prefix)
    assert f"{prefix}/results.parquet" in taken and not fs.exists(f"{prefix}/.lock")

    proxy.resume()  # run A's held requests arrive, after run B finished
    first.wait(timeout=180)
    a_text = a_err.read_text()
    after = folder_bytes(prefix)
    # results, parts, run.json, report and images: run B's bytes. A PUT that the network held back
    # may still create a shard's scratch input under work/ once B removed it (nothing fences a plain
    # create of a name that no longer exists); it is scratch, never read as a result.
    assert {name: data for name, data in after.items() if "/work/" not in name} == taken
    assert all("/work/" in name for name in set(after) - set(taken))
    assert not fs.exists(f"{prefix}/.lock")
    assert first.returncode == 1 and (tmp_path / "a.out").read_text() == ""  # no results, no report named
    assert "could not renew the lease on " + url in a_text  # every failed renewal, with its reason
    assert f"lost the lease on {url} (no renewal succeeded for 7.5 s, so the lease may have expired); " \
           "this run writes nothing more into the folder and stops" in a_text
    last = [line for line in a_text.splitlines() if line.strip()][-1]
    assert last.startswith(f"error: lost the lease on {url}"), a_text[-3000:]
    assert "Traceback" not in a_text


@pytest.mark.timeout(900)
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_ends_a_run_whose_endpoint_went_silent_within_the_grace_and_ten_seconds(s3, proxy, tmp_path,
                                                                                       signum, code):
    name = signal.Signals(signum).name.lower()
    prefix = f"{BUCKET}/runs/silent-{name}"
    grace = 2
    run = start_logged(f"s3://{prefix}", tmp_path / "run", "--set", f"stop_grace_s={grace}", AWS_ENDPOINT_URL=proxy.url)
    fs = bucket_fs()
    wait_until(lambda: fs.glob(f"{prefix}/stages/generate/part-*.parquet") or run.poll() is not None, 420,
               "a first part")
    assert run.poll() is None, (tmp_path / "run.err").read_text()[-3000:]
    proxy.pause()
    time.sleep(1)  # requests now wait on the silent endpoint
    asked = time.monotonic()
    os.killpg(run.pid, signum)  # as Ctrl-C (the whole foreground group) or a supervisor does
    try:
        run.wait(timeout=grace + 15)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        raise AssertionError(f"still running {grace + 15} s after {name}")
    took = time.monotonic() - asked
    stderr = (tmp_path / "run.err").read_text()
    assert run.returncode == code, stderr[-3000:]
    assert took <= grace + stopping_finish_s() + 3, took
    assert f"the run did not end within {grace + stopping_finish_s():g} s of {name.upper()} (work still waiting " \
           "on storage or a device): ending the process; rows not finished stay pending" in stderr
    assert "Traceback" not in stderr


def stopping_finish_s() -> float:
    from catalogen.stopping import FINISH_S

    return FINISH_S


BAD_LEASES = {
    "NaN expiry": (b'{"holder": "pid 1 on elsewhere", "host": "elsewhere", "pid": 1, "expires": NaN}',
                   "expires: Input should be a finite number"),
    "pid out of range": (json.dumps({"holder": "pid 1e30", "host": socket.gethostname(), "pid": 10**30,
                                     "expires": 2e9}).encode(), "pid: Input should be less than or equal to"),
    "too large": (b'{"holder": "' + b"x" * 2**20, f"{2**20 + 12} bytes, more than a lease record's 4096"),
    "not JSON": (b"\x00\xff garbage", "not JSON"),
}


def cli(*args: str, stdin: str | None = None):
    return CliRunner().invoke(app, list(args), input=stdin)


@pytest.mark.parametrize("case", BAD_LEASES)
def test_a_lease_that_cannot_be_read_counts_as_held_and_names_unlock(s3, case):
    from upath import UPath

    from catalogen.storage import lease

    data, reason = BAD_LEASES[case]
    url = f"s3://{BUCKET}/runs/bad-lease-{case.replace(' ', '-')}"
    fs = bucket_fs()
    fs.pipe_file(f"{url[5:]}/run.json", json.dumps({"catalog": {"rows": 2, "path": CATALOG},
                                                    "config": {"stages": ["generate"]}}).encode())
    fs.pipe_file(f"{url[5:]}/.lock", data)
    lock = UPath(f"{url}/.lock", use_listings_cache=False)
    named = f"its lease {url}/.lock cannot be read ({reason}"
    assert named in lease.holder(lock) and f"catalogen unlock {url}" in lease.holder(lock)
    with pytest.raises(lease.LeaseBusy, match="cannot be read"):
        lease.take(lock)

    status = cli("status", url)
    assert status.exit_code == 0 and f"running now: {named}" in status.output, status.output
    refused = cli("run", CATALOG, *DEMO, "--out", url)
    assert refused.exit_code == 1 and f"{url} is in use by another run ({named}" in refused.output, refused.output
    assert "Traceback" not in status.output + refused.output
    assert fs.cat_file(f"{url[5:]}/.lock") == data  # taken over by nobody


def test_unlock_shows_a_lease_escaped_asks_and_removes_only_on_yes(s3):
    url = f"s3://{BUCKET}/runs/unlock"
    fs = bucket_fs()
    hostile = "pid 7 \x1b]0;owned\x07\x1b[2K\u202e on elsewhere"
    fs.pipe_file(f"{url[5:]}/run.json", json.dumps({"catalog": {"rows": 1, "path": CATALOG},
                                                    "config": {"stages": ["generate"]}}).encode())
    fs.pipe_file(f"{url[5:]}/.lock", json.dumps({"holder": hostile, "host": "elsewhere", "pid": 7,
                                                 "expires": time.time() + 600}).encode())
    shown = "pid 7 \\x1b]0;owned\\x07\\x1b[2K\\u202e on elsewhere"
    status = cli("status", url)
    assert f"running now: {shown}" in status.output and "\x1b" not in status.output, status.output

    declined = cli("unlock", url, stdin="n\n")
    assert declined.exit_code == 1 and "nothing removed" in declined.output
    assert f"{url}/.lock is held by {shown} (expires in" in declined.output and "\x1b" not in declined.output
    assert fs.exists(f"{url[5:]}/.lock")
    removed = cli("unlock", url, stdin="y\n")
    assert removed.exit_code == 0 and removed.output.splitlines()[-1] == f"removed {url}/.lock"
    assert not fs.exists(f"{url[5:]}/.lock")
    assert "not running" in cli("status", url).output
    assert cli("unlock", url).output.strip() == f"no run holds {url}; nothing to unlock"


def test_a_lease_record_is_read_up_to_4096_bytes_and_its_length_is_checked(s3, monkeypatch):
    from upath import UPath

    from catalogen.storage import lease

    lock = UPath(f"s3://{BUCKET}/leases/edge/.lock", use_listings_cache=False)
    record = json.dumps({"holder": "pid 1 on elsewhere", "host": "elsewhere", "pid": 1, "expires": time.time() + 600})
    fs = bucket_fs()
    fs.pipe_file(lock.path, record.ljust(4096).encode())  # JSON allows the trailing spaces
    assert lease.holder(lock) == "pid 1 on elsewhere"
    fs.pipe_file(lock.path, record.ljust(4097).encode())
    assert "(4097 bytes, more than a lease record's 4096)" in lease.holder(lock)
    fs.rm_file(lock.path)

    monkeypatch.setenv("CATALOGEN_LEASE_S", "1.99")
    with pytest.raises(lease.LeaseError, match=r"CATALOGEN_LEASE_S='1.99': give seconds from 2 to 3600"):
        with lease.hold(lock):
            pass
    monkeypatch.setenv("CATALOGEN_LEASE_S", "2")
    with lease.hold(lock):
        expires = json.loads(fs.cat_file(lock.path))["expires"]
        assert 0 < expires - time.time() <= 2  # CATALOGEN_LEASE_S, not 60 s
    assert not fs.exists(lock.path)
