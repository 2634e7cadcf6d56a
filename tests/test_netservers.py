"""The loopback test servers of tests/netservers.py: range HTTP server, fault proxy and moto S3."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.netservers import (
    FaultProxy,
    RangeHTTPServer,
    apply_s3_env,
    s3_server,
    scheduled_faults,
    upload_folder,
)

SIZE = 100_000


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "shards"
    root.mkdir()
    (root / "shard-000000.tar").write_bytes(os.urandom(SIZE))
    (root / "shard-000001.tar").write_bytes(os.urandom(SIZE // 3))
    (root / "empty.bin").write_bytes(b"")
    return root


def fetch(conn: http.client.HTTPConnection, method: str, path: str, headers: dict | None = None):
    """(status, headers, body) of one request on a (reusable) connection."""
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.msg, response.read()


def test_range_server_full_ranges_head_missing(folder: Path, capfd):
    data = (folder / "shard-000000.tar").read_bytes()
    with RangeHTTPServer(folder) as server:
        assert server.url.startswith("http://127.0.0.1:") and not server.url.endswith("/")
        # One keep-alive connection for everything: a wrong length anywhere would desynchronise it.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        status, headers, body = fetch(conn, "GET", "/shard-000000.tar")
        assert (status, body) == (200, data)
        assert headers["Accept-Ranges"] == "bytes" and headers["Content-Length"] == str(SIZE)

        status, headers, body = fetch(conn, "GET", "/shard-000000.tar", {"Range": "bytes=10-19"})
        assert (status, body, headers["Content-Range"]) == (206, data[10:20], f"bytes 10-19/{SIZE}")
        status, headers, body = fetch(conn, "GET", "/shard-000000.tar", {"Range": f"bytes={SIZE - 7}-"})
        assert (status, body, headers["Content-Range"]) == (206, data[-7:], f"bytes {SIZE - 7}-{SIZE - 1}/{SIZE}")
        status, headers, body = fetch(conn, "GET", "/shard-000000.tar", {"Range": f"bytes=5-{SIZE * 2}"})
        assert (status, body, headers["Content-Length"]) == (206, data[5:], str(SIZE - 5))
        status, headers, body = fetch(conn, "GET", "/shard-000000.tar", {"Range": "bytes=-4"})
        assert (status, body) == (206, data[-4:])

        status, headers, body = fetch(conn, "GET", "/shard-000000.tar", {"Range": f"bytes={SIZE}-"})
        assert (status, body, headers["Content-Range"]) == (416, b"", f"bytes */{SIZE}")
        status, headers, body = fetch(conn, "GET", "/empty.bin", {"Range": "bytes=0-"})
        assert status == 416
        status, headers, body = fetch(conn, "GET", "/empty.bin")
        assert (status, body, headers["Content-Length"]) == (200, b"", "0")

        status, headers, body = fetch(conn, "HEAD", "/shard-000000.tar")
        assert (status, body, headers["Content-Length"]) == (200, b"", str(SIZE))
        status, headers, body = fetch(conn, "GET", "/nope.tar")
        assert status == 404
        status, headers, body = fetch(conn, "GET", "/../" + folder.parent.name)
        assert status == 404
        status, headers, body = fetch(conn, "GET", "/shard-000000.tar", {"Range": "bytes=0-0"})
        assert (status, body) == (206, data[:1])  # the connection survived all of the above
        conn.close()
        assert server.errors == []
    assert capfd.readouterr().err == ""


def test_proxy_relays_byte_exact_with_keepalive(folder: Path, capfd):
    data = (folder / "shard-000000.tar").read_bytes()
    with RangeHTTPServer(folder) as server, FaultProxy(server.url) as proxy:
        direct = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        proxied = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        for method, path, headers in [
            ("GET", "/shard-000000.tar", {}),
            ("GET", "/shard-000000.tar", {"Range": "bytes=100-2099"}),
            ("HEAD", "/shard-000001.tar", {}),
            ("GET", "/missing", {}),
            ("GET", "/shard-000000.tar", {"Range": f"bytes={SIZE}-"}),
            ("GET", "/shard-000000.tar?x=1", {}),
        ]:
            want = fetch(direct, method, path, headers)
            got = fetch(proxied, method, path, headers)
            assert got[0] == want[0] and got[2] == want[2]
            # Byte-exact headers, in order; only Date may tick between the two requests.
            assert [h for h in got[1].items() if h[0] != "Date"] == [h for h in want[1].items() if h[0] != "Date"]
        direct.close()
        proxied.close()
        fresh = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        assert fetch(fresh, "GET", "/shard-000000.tar")[2] == data
        fresh.close()
        assert proxy.requests[("GET", "/shard-000000.tar")] == 5  # the query string is not part of the path
        assert proxy.requests[("HEAD", "/shard-000001.tar")] == 1
        assert not proxy.injected and proxy.errors == [] and server.errors == []
    assert capfd.readouterr().err == ""


class _ChunkedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for part in (b"hello ", b"chunked ", b"world"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")

    def do_PUT(self):  # echoes the body it received
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Host-Seen", self.headers["Host"])
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_proxy_dechunks_and_forwards_bodies_and_host():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _ChunkedHandler)
    thread = threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_port}") as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
            status, headers, body = fetch(conn, "GET", "/x")
            assert (status, body) == (200, b"hello chunked world")
            assert headers["Content-Length"] == str(len(body)) and "Transfer-Encoding" not in headers
            conn.request("PUT", "/y", body=b"payload", headers={"Host": "example.test:1234"})
            response = conn.getresponse()
            assert (response.status, response.read()) == (201, b"payload")
            assert response.headers["X-Host-Seen"] == "example.test:1234"
            conn.close()
    finally:
        upstream.shutdown()
        upstream.server_close()
        thread.join()


def test_faults_503_reset_cut_then_success(folder: Path, capfd):
    requests = pytest.importorskip("requests")
    data = (folder / "shard-000000.tar").read_bytes()
    plan = scheduled_faults({"shard-000000.tar": ["503", "reset", "cut", None, "cut"]})
    with RangeHTTPServer(folder) as server, FaultProxy(server.url, plan) as proxy:
        url = f"{proxy.url}/shard-000000.tar"
        with requests.Session() as session:
            assert session.head(url, timeout=5).status_code == 200  # HEAD is never faulted
            response = session.get(url, timeout=5)
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "0" and response.headers["Connection"] == "close"
            with pytest.raises(requests.ConnectionError) as reset:
                session.get(url, timeout=5)
            assert "reset" in repr(reset.value).lower()
            with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
                session.get(url, timeout=5)  # the body ends before its Content-Length
            assert session.get(url, timeout=5).content == data
            assert session.get(f"{proxy.url}/shard-000001.tar", timeout=5).status_code == 200

        # http.client shows the exact symptoms: a RST, and a half body followed by EOF.
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        conn.request("GET", "/shard-000000.tar")
        response = conn.getresponse()
        assert response.status == 200 and response.headers["Content-Length"] == str(SIZE)
        with pytest.raises(http.client.IncompleteRead) as cut:
            response.read()
        assert cut.value.partial == data[: SIZE // 2]
        conn.close()
        assert proxy.injected == {"503": 1, "reset": 1, "cut": 2}
        assert proxy.requests[("GET", "/shard-000000.tar")] == 5
        assert proxy.errors == [] and server.errors == []
    assert capfd.readouterr().err == ""


def test_reset_is_a_tcp_reset(folder: Path):
    with RangeHTTPServer(folder) as server, FaultProxy(server.url, lambda method, path, attempt: "reset") as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        conn.request("GET", "/shard-000001.tar")
        with pytest.raises(ConnectionResetError):
            conn.getresponse()
        conn.close()
        assert proxy.injected == {"reset": 1}


def lingering_threads(before: set[threading.Thread], grace: float = 1.0) -> list[threading.Thread]:
    """Threads started since `before` that are still alive after `grace` seconds."""
    deadline = time.monotonic() + grace
    while True:
        alive = [thread for thread in threading.enumerate() if thread not in before]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def test_stall_times_out_client_and_shutdown_is_prompt(folder: Path):
    requests = pytest.importorskip("requests")
    threads_before = set(threading.enumerate())
    plan = scheduled_faults({"shard-000000.tar": ["stall", "stall"]})
    server = RangeHTTPServer(folder)
    proxy = FaultProxy(server.url, plan, stall_seconds=30)
    with server, proxy:
        started = time.monotonic()
        with pytest.raises((requests.ConnectionError, requests.Timeout)):
            requests.get(f"{proxy.url}/shard-000000.tar", timeout=1)
        assert time.monotonic() - started < 5

        # Another stalled request still in flight (the client waits) when the proxy shuts down.
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        sock.sendall(b"GET /shard-000000.tar HTTP/1.1\r\nHost: test\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        # plus an idle keep-alive connection
        idle = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        assert fetch(idle, "HEAD", "/shard-000001.tar")[0] == 200
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2
    assert proxy.injected == {"stall": 2}
    # Stopping also ended the handler threads (stalled, idle keep-alive, the proxy's upstream connections).
    assert lingering_threads(threads_before) == []
    sock.close()
    idle.close()


def test_s3_upload_and_read_direct_and_through_faulty_proxy(folder: Path, monkeypatch, capfd):
    s3fs = pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    apply_s3_env(monkeypatch)
    data = (folder / "shard-000001.tar").read_bytes()
    with s3_server() as endpoint:
        assert endpoint.startswith("http://127.0.0.1:")
        keys = upload_folder(endpoint, "bucket", folder, prefix="train")
        assert keys == ["train/empty.bin", "train/shard-000000.tar", "train/shard-000001.tar"]
        assert upload_folder(endpoint, "bucket", folder) == ["empty.bin", "shard-000000.tar", "shard-000001.tar"]

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        assert sorted(fs.ls("bucket/train")) == [f"bucket/{key}" for key in keys]
        assert fs.cat("bucket/train/shard-000001.tar") == data

        plan = scheduled_faults({"train/shard-000001.tar": ["503"]})
        with FaultProxy(endpoint, plan) as proxy:
            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": proxy.url}, skip_instance_cache=True)
            assert fs.cat("bucket/train/shard-000001.tar") == data  # botocore retries the 503
            with fs.open("bucket/train/shard-000000.tar", "rb") as handle:  # ranged reads pass through
                handle.seek(1000)
                assert handle.read(500) == (folder / "shard-000000.tar").read_bytes()[1000:1500]
            assert proxy.injected == {"503": 1}
            assert proxy.requests[("GET", "/bucket/train/shard-000001.tar")] == 2
            assert proxy.errors == []
    assert capfd.readouterr().err == ""
