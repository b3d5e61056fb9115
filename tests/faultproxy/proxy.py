"""A fault-injecting TCP/TLS proxy between passerelled and the regional PACS (nginx + Orthanc).

It listens on 127.0.0.1:<port> and works at one of two layers, chosen per accepted connection:

- **tcp**: the raw stream (TLS stays end to end between passerelled and nginx). Each connection takes
  the next action from `tcp_faults` (then `("pass",)`): pass through, reset after N bytes from the
  client, stall (no byte either way) after N bytes, or trickle the client's bytes at a fixed rate.
- **http**: TLS is terminated here with `server_cert` (a certificate of the test CA by default; tests
  swap in an expired one or one from another CA), each HTTP/1.1 request is read whole (chunked or
  Content-Length), and `handler(request, forward)` answers it; `forward()` sends the request to nginx
  over TLS with the client certificate and returns nginx's answer, which the handler may rewrite.

`refuse()` closes the listening socket (connection refused) and `listen()` opens it again on the same
port. Everything that happens is appended to `events` with a monotonic timestamp, so tests can count
requests and measure the gaps between attempts at the proxy.

This is a test tool: loopback only, one asyncio loop in a background thread, requests held in memory
(the tests send small instances).
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pydicom
import requests

# Small socket buffers, so that a stalled or trickling proxy is felt by the client quickly instead
# of the kernel absorbing the whole body.
RCVBUF = 16 * 1024
READ_LIMIT = 8 * 1024
HOLD_SECS = 90  # a stalled connection is held at most this long

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
              "content-length", "proxy-connection"}  # fmt: skip

REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           409: "Conflict", 413: "Payload Too Large", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable"}  # fmt: skip


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    started: float  # time.monotonic() when the request head arrived
    ended: float  # when the whole body was read
    uids: list[str] = field(default_factory=list)  # SOP Instance UIDs of the multipart parts


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def dicom_json(self) -> dict:
        return json.loads(self.body) if self.body else {}


@dataclass
class Event:
    kind: str  # connect, request, tls_error, reset, stall, tcp_done
    t: float
    detail: dict = field(default_factory=dict)


Handler = Callable[[Request, Callable[[], Response]], Response]


def multipart_uids(content_type: str, body: bytes) -> list[str]:
    """SOP Instance UIDs of the parts of a `multipart/related` STOW-RS body, in order."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        k, _, v = param.strip().partition("=")
        if k.lower() == "boundary":
            boundary = v.strip('"')
    if not boundary:
        return []
    uids = []
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        _, _, content = part.partition(b"\r\n\r\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        ds = pydicom.dcmread(io.BytesIO(content), stop_before_pixels=True, force=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


class FaultProxy:
    def __init__(self, upstream_port: int, ca_cert: Path, client_cert: Path, client_key: Path,
                 server_cert: Path, server_key: Path, port: int) -> None:  # fmt: skip
        self.upstream_port = upstream_port
        self.port = port
        self.ca_cert, self.client_cert, self.client_key = ca_cert, client_cert, client_key
        self.server_cert, self.server_key = server_cert, server_key
        self.layer = "tcp"
        self.tcp_faults: list[tuple] = []
        self.handler: Handler | None = None
        # Like nginx's client_max_body_size: a body growing past this many bytes gets 413 at once,
        # before the rest is read, then the connection is closed after a lingering read.
        self.max_body: int | None = None
        self.events: list[Event] = []
        # One entry per raw-stream connection, updated live: kind, bytes_up (client -> PACS), first
        # and last (monotonic times of the first and latest bytes forwarded).
        self.streams: list[dict] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._closing: asyncio.Event | None = None
        self._session = requests.Session()
        self._session.trust_env = False
        self._session.verify = str(ca_cert)
        self._session.cert = (str(client_cert), str(client_key))

    # -- control (called from the test's thread) ---------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/dicom-web/studies"

    def start(self) -> "FaultProxy":
        self._thread.start()
        self._call(self._init())
        self.listen()
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._session.close()

    def listen(self) -> None:
        """Accept connections (again) on `port`."""
        self._call(self._listen())

    def refuse(self) -> None:
        """Close the listening socket: new connections are refused by the kernel."""
        self._call(self._unlisten())

    def use_tcp(self, *faults: tuple) -> None:
        """Raw stream mode; each new connection takes the next fault, then passes through."""
        self.tcp_faults = list(faults)
        self.layer = "tcp"

    def use_http(self, handler: Handler | None = None, cert: tuple[Path, Path] | None = None) -> None:
        """TLS-terminating HTTP mode; `handler` None forwards everything unchanged."""
        if cert is not None:
            self.server_cert, self.server_key = cert
        self.handler = handler
        self.layer = "http"

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in list(self.events) if e.kind == kind]

    def requests(self) -> list[Event]:
        return self.of_kind("request")

    def _call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _record(self, kind: str, **detail) -> None:
        self.events.append(Event(kind, time.monotonic(), detail))

    # -- the loop's side ---------------------------------------------------------------------------

    async def _init(self) -> None:
        self._closing = asyncio.Event()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # inherited by accepted sockets
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._server = await asyncio.start_server(self._on_connection, sock=sock, limit=READ_LIMIT)

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _shutdown(self) -> None:
        await self._unlisten()
        assert self._closing is not None
        self._closing.set()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _hold(self) -> None:
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._closing.wait(), HOLD_SECS)
        except asyncio.TimeoutError:
            pass

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._record("connect", layer=self.layer)
        try:
            if self.layer == "http":
                await self._serve_http(reader, writer)
            else:
                fault = self.tcp_faults.pop(0) if self.tcp_faults else ("pass",)
                await self._serve_tcp(fault, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        finally:
            writer.close()

    # -- raw stream --------------------------------------------------------------------------------

    async def _serve_tcp(self, fault: tuple, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind = fault[0]
        if kind == "stall" and fault[1] == 0:
            writer.transport.pause_reading()
            self._record("stall", after=0)
            await self._hold()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port, limit=READ_LIMIT)
        stalled = asyncio.Event()

        async def downstream() -> None:
            try:
                while not stalled.is_set():
                    data = await up_r.read(65536)
                    if not data or stalled.is_set():
                        break
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                if not stalled.is_set() and not writer.is_closing():
                    writer.close()

        down = asyncio.ensure_future(downstream())
        started = time.monotonic()
        sent = 0
        stream = {"kind": kind, "bytes_up": 0, "first": None, "last": None}
        self.streams.append(stream)
        try:
            while True:
                data = await reader.read(1024 if kind == "trickle" else 65536)
                if not data:
                    break
                if kind in ("reset", "stall") and sent + len(data) >= fault[1]:
                    head = data[: fault[1] - sent]
                    up_w.write(head)
                    await up_w.drain()
                    sent += len(head)
                    if kind == "reset":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        writer.transport.abort()  # RST to the client
                        up_w.transport.abort()
                        self._record("reset", after=sent)
                        return
                    stalled.set()
                    writer.transport.pause_reading()
                    up_w.transport.pause_reading()
                    self._record("stall", after=sent)
                    await self._hold()
                    up_w.transport.abort()
                    return
                up_w.write(data)
                await up_w.drain()
                sent += len(data)
                now = time.monotonic()
                stream.update(bytes_up=sent, first=stream["first"] or now, last=now)
                if kind == "trickle":
                    await asyncio.sleep(len(data) / fault[1])
            if up_w.can_write_eof():
                up_w.write_eof()
            await asyncio.wait_for(down, HOLD_SECS)
        finally:
            down.cancel()
            if not up_w.is_closing():
                up_w.close()
            self._record("tcp_done", kind=kind, bytes_up=sent, secs=time.monotonic() - started)

    # -- HTTP --------------------------------------------------------------------------------------

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        try:
            await writer.start_tls(ctx)
        except (ssl.SSLError, ConnectionError, OSError) as e:
            self._record("tls_error", error=str(e))
            return
        loop = asyncio.get_running_loop()
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                return
            started = time.monotonic()
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            body = bytearray()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                    if size == 0:
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":
                            pass
                        break
                    body += (await reader.readexactly(size + 2))[:-2]
                    if self.max_body is not None and len(body) > self.max_body:
                        await self._too_large_early(reader, writer, started, len(body))
                        return
            elif "content-length" in headers:
                body += await reader.readexactly(int(headers["content-length"]))
            req = Request(method, path, headers, bytes(body), started, time.monotonic())
            try:
                req.uids = multipart_uids(headers.get("content-type", ""), req.body)
            except Exception as e:  # noqa: BLE001 - recorded; the handler still answers
                self._record("parse_error", error=repr(e))
            resp = await loop.run_in_executor(None, self._respond, req)
            self._record("request", status=resp.status, uids=req.uids, started=started, ended=req.ended)
            out = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Status')}"]
            out += [f"{k}: {v}" for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP]
            out += [f"Content-Length: {len(resp.body)}", "", ""]
            writer.write("\r\n".join(out).encode("latin-1") + resp.body)
            await writer.drain()

    async def _too_large_early(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               started: float, got: int) -> None:  # fmt: skip
        """nginx's way: answer 413 while the client is still sending, read (and drop) what follows
        for a while so the client gets to read the answer, then close."""
        self._record("request", status=413, uids=[], started=started, ended=time.monotonic(), early=True,
                     body_bytes=got)  # fmt: skip
        body = b"<html><body>413 Request Entity Too Large</body></html>"
        writer.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/html\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        await writer.drain()
        deadline = time.monotonic() + 5  # nginx: lingering_time 30 s, lingering_timeout 5 s
        while time.monotonic() < deadline:
            try:
                if not await asyncio.wait_for(reader.read(65536), 1):
                    break
            except asyncio.TimeoutError:
                break

    def _respond(self, req: Request) -> Response:
        def forward() -> Response:
            r = self._session.request(
                req.method,
                f"https://localhost:{self.upstream_port}{req.path}",
                headers={k: v for k, v in req.headers.items() if k not in HOP_BY_HOP},
                data=req.body,
                timeout=120,
            )
            keep = ("content-type", "retry-after", "location", "www-authenticate")
            return Response(r.status_code, {k: v for k, v in r.headers.items() if k.lower() in keep}, r.content)

        if self.handler is None:
            return forward()
        try:
            return self.handler(req, forward)
        except Exception as e:  # noqa: BLE001 - a broken handler must show, not hang the client
            self._record("handler_error", error=repr(e))
            return Response(599, {"Content-Type": "text/plain"}, f"fault proxy handler failed: {e!r}".encode())


# -- STOW-RS response helpers ----------------------------------------------------------------------

REFERENCED = "00081199"
FAILED = "00081198"
SOP_CLASS = "00081150"
SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"


def item_uid(item: dict) -> str:
    return item[SOP_INSTANCE]["Value"][0]


def fail_instances(resp: Response, reasons: dict[str, int], status: int = 202) -> Response:
    """Moves the instances of `reasons` (SOP Instance UID -> FailureReason) from ReferencedSOPSequence
    to FailedSOPSequence; with `reasons` naming an instance absent from the response, adds it."""
    ds = resp.dicom_json()
    refs = ds.get(REFERENCED, {}).get("Value", [])
    kept = [i for i in refs if item_uid(i) not in reasons]
    failed = ds.get(FAILED, {}).get("Value", [])
    by_uid = {item_uid(i): i for i in refs}
    for uid, reason in reasons.items():
        cls = by_uid[uid][SOP_CLASS] if uid in by_uid else {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}
        failed.append({SOP_CLASS: cls, SOP_INSTANCE: {"vr": "UI", "Value": [uid]},
                       FAILURE_REASON: {"vr": "US", "Value": [reason]}})  # fmt: skip
    if kept:
        ds[REFERENCED] = {"vr": "SQ", "Value": kept}
    else:
        ds.pop(REFERENCED, None)
    ds[FAILED] = {"vr": "SQ", "Value": failed}
    return Response(status, {"Content-Type": "application/dicom+json"}, json.dumps(ds).encode())


def omit_instances(resp: Response, uids: set[str]) -> Response:
    """The same 2xx answer, with the instances of `uids` missing from ReferencedSOPSequence (and not
    listed as failed either)."""
    ds = resp.dicom_json()
    refs = [i for i in ds.get(REFERENCED, {}).get("Value", []) if item_uid(i) not in uids]
    ds[REFERENCED] = {"vr": "SQ", "Value": refs}
    return Response(resp.status, {"Content-Type": "application/dicom+json"}, json.dumps(ds).encode())
