"""The temporary Prefect API server of one `catalogen run`, when the user runs none.

Prefect's own temporary server shares the terminal's process group, so a Ctrl-C reaches it too:
the flow then loses its API mid-run and ends in a long connection-error traceback. It also
outlives a CLI that is SIGKILLed with its group, orphaned under PID 1 for good (both measured).
Here the server runs in a session of its own (no terminal signal reaches it) and watches its
parent: when the CLI is gone, however it died, the server stops.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

PARENT_POLL_S = 1.0


def prefect_environment() -> None:
    """Settings Prefect reads when it is imported; any the user has set win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no usage reporting from batch jobs
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "catalogen")  # model loads etc. in Prefect's logs
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # catalogen also logs outside runs


@dataclass
class PrefectAPI:
    """A Prefect API server of this process's own, started in the background.

    Prefect's API takes seconds to come up; started at once, it does so while the catalog is
    checked and planned. Its URL is published only once it answers, so a refused invocation need
    not wait for it; later invocations in the same process reuse it.
    """

    thread: threading.Thread | None = None
    url: str | None = None

    def ready(self) -> str | None:
        """Wait for it; its API URL, or None if it did not start (the flow then starts Prefect's own)."""
        if self.thread is not None:
            self.thread.join()
        return self.url

    def abandon(self) -> None:
        """A refused run leaves at once; Prefect's exit handler stops the server once it exists."""
        if self.thread is not None:
            self.thread.join(timeout=1.0)


_api: PrefectAPI | None = None
_api_lock = threading.Lock()


def start_prefect_api() -> PrefectAPI:
    """This process's temporary API, starting; an empty one when the user points at a server."""
    global _api
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PrefectAPI()
    with _api_lock:
        failed = _api is not None and _api.thread is not None and not _api.thread.is_alive() and _api.url is None
        if _api is None or failed:
            _api = PrefectAPI()
            _api.thread = threading.Thread(target=_serve, args=(_api,), name="prefect-api-start", daemon=True)
            _api.thread.start()
        return _api


def _serve(api: PrefectAPI) -> None:
    from prefect.server.api.server import SubprocessASGIServer

    class _TiedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            return _launch_tied(self.port)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = _TiedServer(port=port)
    try:
        server.start()
    except Exception:  # noqa: BLE001 - the flow starts Prefect's own, and reports any error
        return
    atexit.register(_quiet_at_exit)  # runs before the exit handler that Prefect's start registered
    api.url = server.api_url


def _quiet_at_exit() -> None:
    """No "Stopping temporary server" line after a command's last line (its result or its error)."""
    logging.getLogger("prefect").setLevel(logging.WARNING)


def _launch_tied(port: int) -> subprocess.Popen[Any]:
    """Prefect's API app under uvicorn, as Prefect's temporary server runs it, but in a session of
    its own and through this module's launcher, which stops it when this process is gone."""
    import prefect
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    uvicorn_args = ["--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
                    "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    return subprocess.Popen([sys.executable, "-m", "catalogen.run.prefect_api", str(os.getpid()), *uvicorn_args],
                            env=env, start_new_session=True)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down cleanly on SIGTERM


def _launch(argv: list[str]) -> None:
    """`python -m catalogen.run.prefect_api PARENT_PID <uvicorn arguments>`: uvicorn, stopped with its parent."""
    import uvicorn

    threading.Thread(target=_watch_parent, args=(int(argv[0]),), daemon=True).start()
    uvicorn.main(args=argv[1:], prog_name="uvicorn")


if __name__ == "__main__":
    _launch(sys.argv[1:])
