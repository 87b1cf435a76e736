"""Catalog images by URL, from servers that stall, trickle or flood: a total deadline, a size cap, a stop."""

from __future__ import annotations

import io
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from catalogen import stopping
from catalogen.media.images import ImageLoadError, ImageSettings, read_source


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        mode = self.path.strip("/")
        body = png()
        length = 50 * 2**20 if mode == "flood" else len(body) * 100
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body) if mode == "fine" else length))
        self.end_headers()
        try:
            if mode == "fine":
                self.wfile.write(body)
            elif mode == "flood":  # 50 MB as fast as it goes
                for _ in range(50):
                    self.wfile.write(b"\0" * 2**20)
            else:  # a byte every half second, for at most a minute
                for byte in (body * 100)[:120]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def image_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


SETTINGS = ImageSettings(url_schemes=("http",), fetch_timeout_s=2, max_fetch_bytes=2**20)


def test_a_url_image_is_fetched(tmp_path: Path):
    with image_server() as url:
        assert read_source(f"{url}/fine", None, tmp_path, SETTINGS) == png()


@pytest.mark.timeout(30)
def test_a_trickling_server_fails_the_row_at_the_deadline(tmp_path: Path):
    with image_server() as url:
        started = time.monotonic()
        with pytest.raises(ImageLoadError, match=r"could not fetch .*/trickle: .*no complete answer within 2 s"):
            read_source(f"{url}/trickle", None, tmp_path, SETTINGS)
        assert time.monotonic() - started < 10  # not the minute the server would take


@pytest.mark.timeout(30)
def test_a_flooding_server_is_cut_off_at_the_size_cap(tmp_path: Path):
    with image_server() as url:
        with pytest.raises(ImageLoadError, match=r"larger than images.max_fetch_bytes=1048576"):
            read_source(f"{url}/flood", None, tmp_path, SETTINGS)


@pytest.mark.timeout(30)
def test_a_stop_ends_a_download_in_flight(tmp_path: Path):
    patient = ImageSettings(url_schemes=("http",), fetch_timeout_s=120)
    threading.Timer(1.0, stopping.ABANDON.set).start()
    try:
        with image_server() as url:
            started = time.monotonic()
            with pytest.raises(stopping.Abandoned):
                read_source(f"{url}/trickle", None, tmp_path, patient)
            assert time.monotonic() - started < 5
    finally:
        stopping.reset()
