"""Loopback network servers for tests: moto S3, a byte-range HTTP file server and a fault-injecting proxy.

Everything binds 127.0.0.1 on a free port (port 0), runs on daemon threads and is a context manager that
shuts its server down on exit, so a test can stream shards over real sockets without network access and
without leaving anything behind that blocks interpreter exit.

    with s3_server() as endpoint:                    # moto, S3 API on http://127.0.0.1:PORT
        upload_folder(endpoint, "bucket", shards_dir)
    with RangeHTTPServer(shards_dir) as http_srv:    # GET/HEAD with single byte ranges
        with FaultProxy(http_srv.url, scheduled_faults({"shard-000001.tar": ["503", None]})) as proxy:
            ...  # read from proxy.url; proxy.injected counts the faults actually injected

Callers of the S3 helpers need credentials in the environment (moto accepts any): set `S3_TEST_ENV`, for
example with `apply_s3_env(monkeypatch)`.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import logging
import os
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOOPBACK = "127.0.0.1"

# moto accepts any credentials; these only have to exist so boto3/s3fs don't go looking elsewhere.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

FAULT_KINDS = ("503", "reset", "cut", "stall")

FaultPlan = Callable[[str, str, int], "str | None"]


def apply_s3_env(monkeypatch) -> None:
    """Put `S3_TEST_ENV` into the environment for the duration of a test (pytest's `monkeypatch`)."""
    for name, value in S3_TEST_ENV.items():
        monkeypatch.setenv(name, value)


# --------------------------------------------------------------------------------------------------- S3


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Run moto's standalone S3-compatible server on 127.0.0.1:<free port>; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # werkzeug (moto's HTTP server) logs every request at INFO through a stderr handler that it installs
    # itself on first use, unless the "werkzeug" logger already has a level. Keep only warnings and errors.
    werkzeug_log = logging.getLogger("werkzeug")
    if werkzeug_log.level == logging.NOTSET or werkzeug_log.level < logging.WARNING:
        werkzeug_log.setLevel(logging.WARNING)

    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield endpoint
    finally:
        # moto keeps its backends in process-wide state shared by every server (and `mock_aws`) in this
        # process: without a reset the next test would see this test's buckets.
        with contextlib.suppress(OSError):
            reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
            urllib.request.urlopen(reset, timeout=10).close()
        server.stop()
        # stop() shuts the serve loop down but leaves the listening socket open.
        wsgi_server = getattr(server, "_server", None)
        if wsgi_server is not None:
            wsgi_server.server_close()


def upload_folder(endpoint: str, bucket: str, folder: Path, prefix: str = "") -> list[str]:
    """Create `bucket` if missing and upload every file directly in `folder`; return the keys (sorted).

    Keys are `<prefix>/<file name>` (or just the file name when `prefix` is empty). Credentials and
    region come from the environment, falling back to `S3_TEST_ENV`.
    """
    import boto3
    from botocore.exceptions import ClientError

    env = {name: os.environ.get(name, default) for name, default in S3_TEST_ENV.items()}
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    try:
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError:
            extra = {}
            if env["AWS_DEFAULT_REGION"] != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
                extra["CreateBucketConfiguration"] = {"LocationConstraint": env["AWS_DEFAULT_REGION"]}
            client.create_bucket(Bucket=bucket, **extra)
        keys = []
        for path in sorted(Path(folder).iterdir()):
            if not path.is_file():
                continue
            key = f"{prefix.strip('/')}/{path.name}" if prefix.strip("/") else path.name
            client.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys
    finally:
        client.close()


# ------------------------------------------------------------------------------------- server plumbing


class _LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP server on 127.0.0.1:0 that is silent and stops promptly.

    It remembers its open client connections so that `stop()` can shut them down: a handler thread
    parked on a keep-alive connection (or in a stall) then ends instead of lingering until exit.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, handler_class):
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []  # unexpected handler exceptions (not disconnects)
        self._live: dict[socket.socket, threading.Thread] = {}
        self._live_lock = threading.Lock()
        self._serve_thread: threading.Thread | None = None
        super().__init__((LOOPBACK, 0), handler_class)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), a reverse DNS lookup we neither need nor want.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_port}"

    def process_request_thread(self, request, client_address):
        with self._live_lock:
            self._live[request] = threading.current_thread()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._live_lock:
                self._live.pop(request, None)

    def handle_error(self, request, client_address) -> None:
        # The default prints a traceback to stderr. Clients hanging up (or `stop()` cutting them off) is
        # normal here; anything else is kept for the test to inspect.
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            self.errors.append(error)

    def start(self) -> None:
        self._serve_thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=f"{type(self).__name__}:{self.server_port}",
            daemon=True,
        )
        self._serve_thread.start()

    def stop(self, join_timeout: float = 1.0) -> None:
        self.stopping.set()  # wakes stalled handlers
        if self._serve_thread is not None:
            self.shutdown()
            self._serve_thread.join()
            self._serve_thread = None
        self.server_close()
        with self._live_lock:
            live = list(self._live.items())
        for connection, _ in live:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + join_timeout
        for _, thread in live:
            thread.join(max(0.0, deadline - time.monotonic()))


class _QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response must therefore carry its length
    disable_nagle_algorithm = True  # header and body go out in separate writes; don't wait for ACKs

    def log_message(self, format, *args) -> None:  # noqa: A002 - signature of the base class
        pass


class _ServerContext:
    """Context-manager wrapper shared by the servers below: bind on construction, serve on enter."""

    _server: _LoopbackServer

    @property
    def url(self) -> str:
        """Base URL, without trailing slash."""
        return self._server.url

    @property
    def port(self) -> int:
        return self._server.server_port

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions raised in request handlers (client disconnects are not recorded)."""
        return self._server.errors

    def __enter__(self):
        self._server.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._server.stop()


# ------------------------------------------------------------------------------------ range file server


class _Unsatisfiable(Exception):
    pass


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a single `bytes=` range, None to serve the whole file.

    Raises `_Unsatisfiable` (416). Malformed or multi-range headers are ignored, as RFC 9110 allows.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":  # suffix range: the last N bytes
            count = int(last)
            if count <= 0 or size == 0:
                raise _Unsatisfiable
            return max(0, size - count), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or end < start and last:  # "bytes=5-3" is invalid, hence ignored
        return None
    if start >= size:
        raise _Unsatisfiable
    return start, min(end, size - 1)


class _RangeHandler(_QuietHandler):
    server: _RangeServer

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, send_body: bool) -> None:
        relative = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        target = (self.server.root / relative).resolve()
        if not target.is_relative_to(self.server.root) or not target.is_file():
            self._send_short(404, send_body, b"not found\n")
            return
        size = target.stat().st_size
        try:
            byte_range = _parse_range(self.headers.get("Range"), size)
        except _Unsatisfiable:
            self._send_short(416, send_body, b"", {"Content-Range": f"bytes */{size}"})
            return
        first, last = byte_range if byte_range else (0, size - 1)
        length = max(0, last - first + 1)
        self.send_response(206 if byte_range else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if byte_range:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if not send_body:
            return
        with open(target, "rb") as handle:
            handle.seek(first)
            remaining = length
            while remaining > 0:
                chunk = handle.read(min(remaining, 1 << 20))
                if not chunk:  # file shrank underneath us; the client will see a short body
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                remaining -= len(chunk)

    def _send_short(self, status: int, send_body: bool, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Accept-Ranges", "bytes")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


class _RangeServer(_LoopbackServer):
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        super().__init__(_RangeHandler)


class RangeHTTPServer(_ServerContext):
    """Serve the files under `root` at `.url` over HTTP/1.1 (GET/HEAD, keep-alive, single byte ranges).

    `Range: bytes=a-b`, `bytes=a-` and `bytes=-n` get 206 with `Content-Range`; a range starting past the
    end gets 416 (`Content-Range: bytes */size`); missing files 404; other methods 501.
    """

    def __init__(self, root: Path | str):
        self._server = _RangeServer(Path(root))

    @property
    def root(self) -> Path:
        return self._server.root


# --------------------------------------------------------------------------------------- fault proxy


def _set_linger_reset(sock: socket.socket) -> None:
    # SO_LINGER on with a zero timeout makes close() discard unsent data and send a TCP RST instead of
    # the orderly FIN: the client gets ECONNRESET ("connection reset by peer") rather than a clean EOF.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _ProxyHandler(_QuietHandler):
    server: _ProxyServer
    upstream: http.client.HTTPConnection | None = None
    upstream_used = False  # whether `upstream` has served a request (a stale keep-alive may be retried)

    def __getattr__(self, name: str):
        # BaseHTTPRequestHandler dispatches to do_<METHOD>; forward every method, whatever its name.
        if name.startswith("do_"):
            return self._proxy
        raise AttributeError(name)

    def handle(self) -> None:
        try:
            super().handle()
        finally:
            self._drop_upstream()

    # -- the request

    def _read_body(self) -> bytes:
        """The request body exactly as received (chunk framing kept when the client chunked it)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                parts.append(line)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                parts.append(self.rfile.read(size + 2))  # data and its CRLF
            while True:  # trailer section, ends with an empty line
                line = self.rfile.readline(65537)
                parts.append(line)
                if line in (b"\r\n", b"\n", b""):
                    break
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _proxy(self) -> None:
        body = self._read_body()  # read first: closing with unread input would turn a FIN into a RST
        path = urllib.parse.urlsplit(self.path).path
        kind = self.server.count_and_pick_fault(self.command, path)
        if kind == "503":
            self.server.count_injected(kind)
            payload = b"injected fault: 503\n"
            self.wfile.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\nRetry-After: 0\r\nConnection: close\r\n\r\n%s" % (len(payload), payload)
            )
            self.close_connection = True
            return
        if kind == "reset":
            self.server.count_injected(kind)
            self._reset_client()
            return

        try:
            response, payload = self._forward(body)
        except (OSError, http.client.HTTPException) as error:
            self._drop_upstream()
            message = f"proxy: upstream failed: {error!r}\n".encode()
            self.wfile.write(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(message), message)
            )
            self.close_connection = True
            return

        head = self._response_head(response, payload)
        if response.will_close:
            # The upstream closes (Connection: close, or an HTTP/1.0 or length-less reply), and the relayed
            # headers tell the client so: close our side as well.
            self._drop_upstream()
            self.close_connection = True
        if kind is None:
            self.wfile.write(head + payload)
            return
        # "cut" and "stall": the full headers (and Content-Length), then only half the body.
        self.server.count_injected(kind)
        self.wfile.write(head + payload[: len(payload) // 2])
        if kind == "stall":
            self.server.stopping.wait(self.server.stall_seconds)
        # Orderly close (FIN) for both: the client reliably receives the half body, then a premature EOF.
        self.close_connection = True

    # -- the upstream side

    def _forward(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
        target = self.server.upstream_prefix + self.path
        for retry in (False, True):
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(
                    self.server.upstream_host, self.server.upstream_port, timeout=self.server.upstream_timeout
                )
                self.upstream_used = False
            reused = self.upstream_used
            try:
                self.upstream.putrequest(self.command, target, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():  # order and Host header exactly as the client sent
                    self.upstream.putheader(name, value)
                self.upstream.endheaders(body if body else None)
                response = self.upstream.getresponse()  # skips interim 100 Continue replies
                payload = response.read()  # decodes chunked bodies
                self.upstream_used = True
                return response, payload
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self._drop_upstream()
                if retry or not reused:
                    raise
                # An idle keep-alive connection the upstream had already closed: once more on a fresh one.
        raise AssertionError("unreachable")

    def _response_head(self, response: http.client.HTTPResponse, payload: bytes) -> bytes:
        version = "1.0" if response.version == 10 else "1.1"
        lines = [f"HTTP/{version} {response.status} {response.reason}"]
        for name, value in response.msg.items():
            if response.chunked and name.lower() == "transfer-encoding":
                # The body was de-chunked while reading it, so it is sent with its length instead.
                lines.append(f"Content-Length: {len(payload)}")
            else:
                lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def _reset_client(self) -> None:
        _set_linger_reset(self.connection)
        # Close for real right now (rfile holds a reference that would postpone the close): socketserver's
        # own shutdown_request() would shutdown(SHUT_WR) first, sending a FIN before the RST. wfile holds
        # no reference and stays open because handle_one_request() still flushes it.
        self.rfile.close()
        self.connection.close()
        self.close_connection = True


class _ProxyServer(_LoopbackServer):
    def __init__(self, upstream: str, faults: FaultPlan | None, stall_seconds: float, upstream_timeout: float):
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// base URL, got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_prefix = parts.path.rstrip("/")
        self.upstream_timeout = upstream_timeout
        self.faults = faults
        self.stall_seconds = stall_seconds
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.injected: collections.Counter = collections.Counter()
        super().__init__(_ProxyHandler)

    def count_and_pick_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            attempt = self.requests[(method, path)]
            self.requests[(method, path)] += 1
        kind = self.faults(method, path, attempt) if self.faults else None
        if kind is not None and kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        return kind

    def count_injected(self, kind: str) -> None:
        with self.lock:
            self.injected[kind] += 1


class FaultProxy(_ServerContext):
    """An HTTP/1.1 proxy on `.url` in front of `upstream` that injects faults chosen by `faults`.

    Every request (any method; headers, Host and body relayed as received) is forwarded to `upstream`
    ("http://host:port") and the reply relayed byte for byte, keep-alive included, unless
    `faults(method, path, attempt)` names a fault, where `path` is the request path without the query and
    `attempt` the number of earlier requests with the same (method, path). Kinds (see `FAULT_KINDS`):

    - "503": reply 503 with `Retry-After: 0` and `Connection: close`, then close (upstream not contacted);
    - "reset": close the client connection with a TCP RST, sending nothing (upstream not contacted);
    - "cut": relay status and headers (full Content-Length) but only the first half of the body, then close;
    - "stall": like "cut", but wait `stall_seconds` (cut short when the proxy stops) before closing.

    A chunked upstream reply is relayed de-chunked, with a Content-Length. `.injected` counts the faults
    injected, `.requests` every request by (method, path); `.errors` holds unexpected handler exceptions
    (e.g. an unknown fault kind). Leaving the context stops within about a second, stalls or not.
    """

    def __init__(self, upstream: str, faults: FaultPlan | None = None, stall_seconds: float = 30.0,
                 upstream_timeout: float = 60.0):
        self._server = _ProxyServer(upstream, faults, stall_seconds, upstream_timeout)

    @property
    def injected(self) -> collections.Counter:
        return self._server.injected

    @property
    def requests(self) -> collections.Counter:
        return self._server.requests


def scheduled_faults(plan: Mapping[str, Sequence[str | None]]) -> FaultPlan:
    """A `faults` callable following a per-object schedule.

    A GET whose (percent-decoded) path ends with a name in `plan` gets `plan[name][attempt]` (a kind, or
    None for a clean relay) while `attempt < len(plan[name])`, and no fault after that. If several names
    match, the longest wins. Other methods (HEAD, PUT, ...) are never faulted.
    """
    schedule = {name: list(kinds) for name, kinds in plan.items()}
    for name, kinds in schedule.items():
        unknown = [kind for kind in kinds if kind is not None and kind not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds for {name!r}: {unknown}; expected {FAULT_KINDS} or None")

    def faults(method: str, path: str, attempt: int) -> str | None:
        if method != "GET":
            return None
        decoded = urllib.parse.unquote(path)
        matches = [name for name in schedule if decoded.endswith(name) or path.endswith(name)]
        if not matches:
            return None
        kinds = schedule[max(matches, key=len)]
        return kinds[attempt] if attempt < len(kinds) else None

    return faults
