"""`catalogen review`: a local web page where a person decides what ships, one product at a time.

The run's results are read once and kept in memory (a 100,000-row run pages in milliseconds);
they are read again when results.parquet changes, and decision files that another reviewer (a
second browser, a second `review` process) wrote are picked up on the next page request. Every
decision is written through catalogen/review/decisions.py before the browser hears back, so a
server killed after answering has lost nothing; catalogen/review/state.py says what it means.

Security: a random token, printed once in the URL, then kept in an HttpOnly, SameSite=Strict
cookie, guards every request (none: 401, a wrong one: 403); state changes are JSON POSTs, which
another site cannot make a browser send with that cookie. Only the files results.parquet names
are served (the images under the run folder by their recorded path, a row's catalog photo by its
row); text reaches the page through jinja2's autoescape and the page code's `textContent` only,
and the Content-Security-Policy allows no inline script.
"""

from __future__ import annotations

import io
import mimetypes
import re
import secrets
import socket
import threading
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from catalogen.publish.report import AFTER_COLUMNS, BEFORE_COLUMNS, CAPTION_COLUMN
from catalogen.review import decisions as review_decisions
from catalogen.review.decisions import KINDS, Decision, DecisionError
from catalogen.review.state import REVIEW_SCHEMA, STATES, apply_decisions, with_defaults
from catalogen.run.results import image_prefix, recorded_images
from catalogen.storage.locations import display, location
from catalogen.storage.store import RunStateError, RunStore

PAGE_PRODUCTS = 100
REASONS_SHOWN = 50
SCORE_COLUMNS = ("score_aesthetic", "score_clip", "caption_clip_score")
SHOWN_COLUMNS = ("id", "variant", "status", "error", "prompt", "image", "image_path", "image_sha256", *SCORE_COLUMNS,
                 *BEFORE_COLUMNS, *AFTER_COLUMNS, CAPTION_COLUMN)
COOKIE = "catalogen_review"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ASSETS = Path(__file__).with_name("review_assets")
STATIC = {"review.js": "text/javascript", "review.css": "text/css"}
DECIDED = tuple(k for k in KINDS if k != "undo")  # what the page's POST /api/decide takes
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class ReviewError(RuntimeError):
    """The page cannot serve this run (no results); the message names the file."""


class Refused(Exception):
    """A request the page answers with an error status and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


UNRANKED = 1 << 30


def _objects(column: pa.ChunkedArray) -> np.ndarray:
    """A column as a numpy array of Python values (None for null), which the page updates in place."""
    values = np.empty(len(column), dtype=object)
    values[:] = column.to_pylist()
    return values


def _image_type(data: bytes) -> str:
    """The MIME type of an image given as bytes (served with nosniff, so it must be right)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError):
        return "application/octet-stream"


def _first(row: dict[str, Any], columns: tuple[str, ...]) -> Any:
    return next((row[c] for c in columns if row.get(c) is not None), None)


class ReviewData:
    """The run's rows and review states in memory, products in catalog order, kept current."""

    def __init__(self, store: RunStore, reviewer: str) -> None:
        self.store = store
        self.reviewer = reviewer
        self.lock = threading.RLock()
        self.catalog_folder = self._catalog_folder()
        self.load()

    # -- reading --
    def _catalog_folder(self) -> Any:
        try:
            path = self.store.read_run_json().get("catalog", {}).get("path")
        except RunStateError:
            return None
        return location(path).parent if path else None

    def _results_version(self) -> Any:
        """What changes when results.parquet is replaced (every write is a new file or object)."""
        path = self.store.results_path
        try:
            if self.store.remote:
                info = self.store.root.fs.info(path.path)
                return info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
            stat = path.stat()
            return stat.st_mtime_ns, stat.st_size, stat.st_ino
        except FileNotFoundError:
            raise ReviewError(f"{display(path)} does not exist: run `catalogen run` into "
                              f"{display(self.store.root)} first") from None

    def load(self) -> None:
        """Read results.parquet and every decision; index products, files and states."""
        with self.lock:
            self.version = self._results_version()
            self.main: np.ndarray | None = None  # set once the decisions are applied
            table = with_defaults(self.store.read_table(self.store.results_path))
            self.table = table
            self.small = table.select(["id", "variant", "image_sha256", *REVIEW_SCHEMA.names])
            self.shown = table.select([c for c in SHOWN_COLUMNS if c in table.column_names])
            self.base = {name: _objects(table.column(name)) for name in REVIEW_SCHEMA.names}
            self.now = {name: values.copy() for name, values in self.base.items()}
            self.variant = table.column("variant").to_numpy(zero_copy_only=False)
            self.sha = table.column("image_sha256").to_numpy(zero_copy_only=False)
            self._index_products(table.column("id"))
            self._index_files(table)
            self.files: set[str] = set()
            self.decided: dict[str, Decision] = {}
            self.standing: dict[str, Decision] = {}
            self._take_decisions()
            self.main = self._all_main_rows()

    def _index_products(self, ids: pa.ChunkedArray) -> None:
        unique = pc.unique(ids)  # in order of first appearance: the catalog's
        codes = pc.index_in(ids, value_set=unique).to_numpy(zero_copy_only=False)
        order = np.lexsort((self.variant, codes))
        self.ids = unique.to_pylist()
        self.product_of = {value: i for i, value in enumerate(self.ids)}
        self.order = order
        self.starts = np.searchsorted(codes[order], np.arange(len(self.ids) + 1))
        self.codes = codes

    def _index_files(self, table: pa.Table) -> None:
        """The run's own image files that the page may serve: every recorded image path."""
        columns = ["image_path", *(f"{image_prefix(name)}_path" for name in recorded_images(table))]
        self.paths: set[str] = set()
        for column in dict.fromkeys(columns):
            if column in table.column_names:
                self.paths.update(v for v in pc.unique(table.column(column)).to_pylist() if v)

    def rows(self, product: int) -> np.ndarray:
        return self.order[self.starts[product]:self.starts[product + 1]]

    def _ranking(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row, what puts it first among its product's: selected, then a better rank."""
        unselected = np.array([not s for s in self.now["selected"]], dtype=bool)
        rank = np.array([UNRANKED if r is None else r for r in self.now["select_rank"]], dtype=np.int64)
        return unselected, rank

    def _all_main_rows(self) -> np.ndarray:
        """Per product, the row shown large: its best-ranked selected candidate, else its best-ranked
        (ties: the lower variant)."""
        unselected, rank = self._ranking()
        order = np.lexsort((self.variant, rank, unselected, self.codes))
        return order[np.searchsorted(self.codes[order], np.arange(len(self.ids)))]

    def _main_row(self, product: int) -> int:
        rows = self.rows(product)
        selected, rank = self.now["selected"], self.now["select_rank"]
        return int(min(rows, key=lambda r: (not selected[r], UNRANKED if rank[r] is None else rank[r], self.variant[r])))

    def _take_decisions(self) -> set[str]:
        """Read decision files not read yet; apply them. Returns the ids whose state may have changed."""
        listed, found = review_decisions.listed(self.store, self.files)
        self.files = set(listed)
        new = {name: d for name, d in found.items() if name not in self.decided}
        if not new:
            return set()
        self.decided.update(new)
        ids = {d.id for d in new.values()}
        self.standing = review_decisions.latest(self.decided.values())
        self._apply(ids)
        return ids

    def _apply(self, ids: set[str]) -> None:
        """Recompute the review columns of these ids' rows from their base and standing decision."""
        products = [self.product_of[i] for i in ids if i in self.product_of]
        if not products:
            return
        rows = np.concatenate([self.rows(p) for p in products])
        decided = apply_decisions(self.small.take(rows), {i: self.standing[i] for i in ids if i in self.standing})
        for name in REVIEW_SCHEMA.names:
            self.now[name][rows] = _objects(decided.column(name))
        if self.main is not None:
            for product in products:
                self.main[product] = self._main_row(product)

    def refresh(self) -> None:
        """Pick up a new results.parquet (everything again) or new decision files (those alone)."""
        with self.lock:
            if self._results_version() != self.version:
                self.load()
            else:
                self._take_decisions()

    # -- what the page shows --
    def page(self, state: str, reason: str, number: int) -> dict[str, Any]:
        with self.lock:
            states = self.now["review_state"][self.main]
            reasons = self.now["review_reason"][self.main]
            keep = np.ones(len(self.ids), dtype=bool)
            if state:
                keep &= states == state
            if reason:
                keep &= reasons == reason
            chosen = np.flatnonzero(keep)
            pages = max(1, -(-len(chosen) // PAGE_PRODUCTS))
            number = min(max(1, number), pages)
            shown = chosen[(number - 1) * PAGE_PRODUCTS:number * PAGE_PRODUCTS]
            return {"page": number, "pages": pages, "total": int(len(chosen)), "products": len(self.ids),
                    **self.tally(), "items": self.products([int(p) for p in shown])}

    def tally(self) -> dict[str, Any]:
        """Products per state, and the most common reasons (the filter's, and a reject's to pick from)."""
        states = Counter(self.now["review_state"][self.main].tolist())
        reasons = Counter(self.now["review_reason"][self.main].tolist())
        reasons.pop(None, None)
        return {"counts": {s: states.get(s, 0) for s in STATES},
                "reasons": [[reason, n] for reason, n in reasons.most_common(REASONS_SHOWN)]}

    def products(self, products: list[int]) -> list[dict[str, Any]]:
        """Products as JSON, their rows read in one go."""
        rows = [self.rows(p) for p in products]
        records = self.shown.take(np.concatenate(rows)).to_pylist() if products else []
        ends = np.cumsum([len(r) for r in rows])
        return [self._product(p, r, records[end - len(r):end]) for p, r, end in zip(products, rows, ends)]

    def product(self, product: int) -> dict[str, Any]:
        return self.products([product])[0]

    def _product(self, product: int, rows: np.ndarray, records: list[dict[str, Any]]) -> dict[str, Any]:
        """One product: its candidates (with scores, prompts, caption) and its state."""
        candidates = []
        for row, record in zip(rows, records):
            after = _first(record, AFTER_COLUMNS) or record.get("prompt")
            candidates.append({
                "variant": record["variant"], "status": record["status"], "error": record.get("error"),
                "image": f"/files/{record['image_path']}" if record.get("image_path") else None,
                "key": record.get("image_sha256"),
                "scores": {c: record[c] for c in SCORE_COLUMNS if record.get(c) is not None and record[c] == record[c]},
                "before": _first(record, BEFORE_COLUMNS) or record.get("prompt"), "after": after,
                "caption": record.get(CAPTION_COLUMN),
                **self._state(row),
            })
        main = int(self.main[product])
        photo = records[0].get("image") is not None
        by_id = self.standing.get(self.ids[product])
        return {"id": self.ids[product], "main": int(self.variant[main]), **self._state(main),
                "photo": f"/photo/{int(rows[0])}" if photo else None, "candidates": candidates,
                "decision": by_id.decision if by_id else None}

    def _state(self, row: int) -> dict[str, Any]:
        at = self.now["review_at"][row]
        return {"state": self.now["review_state"][row], "reason": self.now["review_reason"][row],
                "by": self.now["review_by"][row], "at": None if at is None else at.isoformat(),
                "selected": bool(self.now["selected"][row]),
                "rank": None if self.now["select_rank"][row] is None else int(self.now["select_rank"][row])}

    # -- files --
    def image(self, path: str) -> tuple[bytes, str]:
        if path not in self.paths:
            raise Refused(404, "not an image of this run")
        return self.store.read_bytes(path), mimetypes.guess_type(path)[0] or "application/octet-stream"

    def photo(self, row: int) -> tuple[bytes, str]:
        """A row's catalog photo, as the catalog gave it: bytes, or a path (relative to the catalog's folder)."""
        if not 0 <= row < self.table.num_rows:
            raise Refused(404, "no such row")
        given = self.table.column("image")[row].as_py() if "image" in self.table.column_names else None
        if isinstance(given, dict):  # a `datasets` Image: its bytes, else its path
            given = given.get("bytes") or given.get("path")
        if isinstance(given, bytes):
            return given, _image_type(given)
        if not given:
            raise Refused(404, "this row has no catalog photo")
        if _SCHEME.match(given) or given.startswith("/"):
            where = location(given)
        elif self.catalog_folder is not None:
            where = self.catalog_folder / given
        else:
            raise Refused(404, "the catalog's folder is unknown")
        try:
            return where.read_bytes(), mimetypes.guess_type(given)[0] or "application/octet-stream"
        except OSError:
            raise Refused(404, "the catalog photo cannot be read") from None

    # -- deciding --
    def decide(self, body: dict[str, Any]) -> dict[str, Any]:
        """Record one decision (durable before this returns) and the product as it now stands."""
        kind, row_id = body.get("decision"), body.get("id")
        if kind not in DECIDED:
            raise Refused(400, f"decision must be one of {', '.join(DECIDED)}")
        with self.lock:
            self.refresh()
            product = self.product_of.get(row_id) if isinstance(row_id, str) else None
            if product is None:
                raise Refused(404, f"no product {row_id!r} in this run")
            rows = {int(self.variant[r]): r for r in self.rows(product)}
            variant = body.get("variant")
            if not isinstance(variant, int) or isinstance(variant, bool) or variant not in rows:
                raise Refused(400, f"{row_id} has no variant {variant!r}")
            key = self.sha[rows[variant]]
            if key is None:
                raise Refused(409, f"{row_id} variant {variant} has no image to decide on")
            if body.get("key") != key:
                raise Refused(409, f"{row_id} variant {variant}'s image changed since the page showed it: reload")
            decision = Decision(id=row_id, decision=kind, variant=variant, key=key, reviewer=self.reviewer,
                                at=review_decisions.now(), reason=str(body.get("reason") or "")[:500],
                                note=str(body.get("note") or "")[:500])
            return self._record(decision)

    def undo(self) -> dict[str, Any]:
        """Take back this reviewer's last decision still standing."""
        with self.lock:
            self.refresh()
            undone = {d.undoes for d in self.decided.values() if d.decision == "undo"}
            mine = [d for d in self.decided.values()
                    if d.reviewer == self.reviewer and d.decision != "undo" and d.name not in undone]
            if not mine:
                raise Refused(409, f"{self.reviewer} has no decision to undo")
            last = max(mine, key=lambda d: (d.at, d.name))
            return self._record(Decision(id=last.id, decision="undo", variant=last.variant, key=last.key,
                                         reviewer=self.reviewer, at=review_decisions.now(), undoes=last.name))

    def _record(self, decision: Decision) -> dict[str, Any]:
        written = review_decisions.record(self.store, decision)
        self.decided[written.name] = written
        self.files.add(f"{review_decisions.FOLDER}/{written.name}")
        self.standing = review_decisions.latest(self.decided.values())
        self._apply({written.id})
        return {"decision": asdict(written), "product": self.product(self.product_of[written.id])}


# --- the web app ----------------------------------------------------------------------------------


class TokenGuard:
    """Every request carries the token: in the URL once (then a cookie is set), else in the cookie."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        cookie = f"{COOKIE}_{(scope.get('server') or ('', 0))[1]}"  # one per port: cookies ignore ports
        given = request.query_params.get("token")
        if given is not None:
            response: Response = RedirectResponse(request.url.path, status_code=303) if self._valid(given) \
                else _error(403, "wrong token: open the URL that `catalogen review` printed")
            if self._valid(given):
                response.set_cookie(cookie, self.token, httponly=True, samesite="strict", path="/")
        elif cookie not in request.cookies:
            response = _error(401, "no token: open the URL that `catalogen review` printed")
        elif not self._valid(request.cookies[cookie]):
            response = _error(403, "wrong token: open the URL that `catalogen review` printed")
        elif request.method == "POST" and not self._same_origin(request):
            response = _error(403, "a decision is a JSON POST from this page")
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    def _valid(self, given: str) -> bool:
        return secrets.compare_digest(given.encode(), self.token.encode())

    @staticmethod
    def _same_origin(request: Request) -> bool:
        """A JSON body (a form of another site cannot send one without asking first) from this origin."""
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        json_body = request.headers.get("content-type", "").split(";")[0].strip() == "application/json"
        return json_body and (origin is None or origin == f"{request.url.scheme}://{host}")


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=HEADERS)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(ASSETS), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def build_app(data: ReviewData, token: str, title: str) -> Starlette:
    """The page, its data and its actions, behind the token."""
    template = _environment().get_template("review.html.j2")

    def guarded(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def run(request: Request) -> Response:
            try:
                response = handler(request)
            except Refused as exc:
                return _error(exc.status, str(exc))
            except (DecisionError, OSError, RunStateError, ReviewError) as exc:
                return _error(500, f"{type(exc).__name__}: {exc}")
            response.headers.update(HEADERS)
            return response
        return run

    def index(request: Request) -> Response:
        return HTMLResponse(template.render(title=title, reviewer=data.reviewer, states=STATES))

    def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            raise Refused(404, "no such file")
        return Response((ASSETS / name).read_bytes(), media_type=STATIC[name])

    def products(request: Request) -> Response:
        data.refresh()
        query = request.query_params
        try:
            number = int(query.get("page", "1"))
        except ValueError:
            raise Refused(400, "page must be a number") from None
        return JSONResponse(data.page(query.get("state", ""), query.get("reason", ""), number))

    def files(request: Request) -> Response:
        body, kind = data.image(request.path_params["path"])
        return Response(body, media_type=kind)

    def photo(request: Request) -> Response:
        body, kind = data.photo(request.path_params["row"])
        return Response(body, media_type=kind)

    async def decide(request: Request) -> Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body is not a JSON object")
        return await _threaded(guarded(lambda _: JSONResponse(data.decide(body))), request)

    async def undo(request: Request) -> Response:
        return await _threaded(guarded(lambda _: JSONResponse(data.undo())), request)

    routes = [
        Route("/", guarded(index)),
        Route("/assets/{name}", guarded(asset)),
        Route("/favicon.ico", guarded(lambda request: Response(status_code=204))),  # none: not a 404 in the console
        Route("/api/products", guarded(products)),
        Route("/files/{path:path}", guarded(files)),
        Route("/photo/{row:int}", guarded(photo)),
        Route("/api/decide", decide, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(TokenGuard, token=token)])


async def _threaded(handler: Callable[[Request], Response], request: Request) -> Response:
    """A blocking handler (a file written and synced) off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(handler, request)


# --- serving --------------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); OSError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket, host: str, token: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={token}"


def serve(data: ReviewData, sock: socket.socket, token: str, title: str) -> None:
    """Answer requests until Ctrl-C (or SIGTERM); uvicorn finishes open requests, then returns (it
    raises the signal again once stopped: that is the stop asked for, not an error)."""
    import uvicorn

    config = uvicorn.Config(build_app(data, token, title), log_level="warning", access_log=False,
                            lifespan="off", server_header=False)
    data.page("", "", 1)  # the first request then costs what every other does
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass


def new_token() -> str:
    return secrets.token_urlsafe(24)

