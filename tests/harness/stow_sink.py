"""A streaming STOW-RS sink: an HTTPS server on 127.0.0.1 that takes `multipart/related` requests of any
size in bounded memory, answers each with a proper `application/dicom+json` STOW-RS response, and records,
per part, the SOP Instance UID (from the part's meta group) and the SHA-256 of the dataset after group 0002.

For the multi-GB tests: Orthanc ingests STOW-RS at a few MB/s, this sink at the speed of TLS and SHA-256.
It requires a client certificate from the test CA, as the nginx front of Orthanc does. It stores nothing:
it only proves what arrived, byte for byte, and confirms it.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socketserver
import ssl
import struct
import threading
from dataclasses import dataclass

from .part10 import PREAMBLE_AND_MAGIC, meta_end_offset
from .pki import Pki

READ_SIZE = 1 << 20  # bytes read from the socket at a time: the sink's memory bound, give or take
HEAD_SIZE = 64 * 1024  # bytes of a part kept until its meta group is parsed
MAX_HEADERS = 16 * 1024  # a part's headers longer than this are refused


@dataclass(frozen=True)
class ReceivedPart:
    sop_class_uid: str
    sop_instance_uid: str
    size: int  # the part's bytes, meta group included
    dataset_sha256: str  # SHA-256 of the dataset after group 0002


def meta_value(head: bytes, end: int, tag: tuple[int, int]) -> str:
    """A UI value of the meta group (explicit VR little endian) that ends at `end`, or '' if absent."""
    pos = PREAMBLE_AND_MAGIC
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", head, pos)
        vr = head[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV", b"SV", b"UV"):
            (length,) = struct.unpack_from("<I", head, pos + 8)
            at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            at = pos + 8
        if (group, elem) == tag:
            return head[at : at + length].rstrip(b"\0 ").decode("ascii")
        pos = at + length
    return ""


class _Part:
    """One part's bytes, pushed in pieces: hashes the dataset after group 0002 without keeping it."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.head = bytearray()
        self.meta_end: int | None = None
        self.size = 0
        self.sop_class_uid = self.sop_instance_uid = ""

    def _parse_head(self) -> None:
        head = bytes(self.head)
        self.meta_end = meta_end_offset(head)
        self.sop_class_uid = meta_value(head, self.meta_end, (0x0002, 0x0002))
        self.sop_instance_uid = meta_value(head, self.meta_end, (0x0002, 0x0003))
        self.hash.update(head[self.meta_end :])
        self.head = bytearray()

    def feed(self, data: memoryview) -> None:
        self.size += len(data)
        if self.meta_end is None:
            self.head += data
            if len(self.head) >= HEAD_SIZE:
                self._parse_head()
        else:
            self.hash.update(data)

    def finish(self) -> ReceivedPart:
        if self.meta_end is None:
            self._parse_head()
        return ReceivedPart(self.sop_class_uid, self.sop_instance_uid, self.size, self.hash.hexdigest())


class MultipartReader:
    """Incremental `multipart/related` parser (RFC 2046): feed() the body in pieces of any size, get the
    finished parts. Holds at most one piece plus a delimiter's length of bytes."""

    def __init__(self, boundary: bytes) -> None:
        # A CRLF is put in front of the body so that every delimiter, the first one too, is CRLF--boundary.
        self.delimiter = b"\r\n--" + boundary
        self.buf = b"\r\n"
        self.state = "preamble"  # preamble -> after_delimiter -> headers -> body -> after_delimiter ... -> done
        self.part: _Part | None = None
        self.parts: list[ReceivedPart] = []

    def feed(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        while self._step():
            pass

    def _step(self) -> bool:
        buf, d = self.buf, self.delimiter
        if self.state in ("preamble", "body"):
            at = buf.find(d)
            if at < 0:
                keep = len(d) - 1
                if self.state == "body" and len(buf) > keep:
                    assert self.part is not None
                    self.part.feed(memoryview(buf)[: len(buf) - keep])
                    self.buf = buf[len(buf) - keep :]
                return False
            if self.state == "body":
                assert self.part is not None
                self.part.feed(memoryview(buf)[:at])
                self.parts.append(self.part.finish())
                self.part = None
            self.buf = buf[at + len(d) :]
            self.state = "after_delimiter"
            return True
        if self.state == "after_delimiter":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self.state, self.buf = "done", b""
                return False
            end = buf.find(b"\r\n")
            if end < 0:
                return False
            self.buf, self.state = buf[end + 2 :], "headers"  # transport padding and CRLF
            return True
        if self.state == "headers":
            end = buf.find(b"\r\n\r\n")
            if end < 0 and not buf.startswith(b"\r\n"):
                if len(buf) > MAX_HEADERS:
                    raise ValueError("part headers longer than 16 KiB")
                return False
            headers = b"" if buf.startswith(b"\r\n") else buf[:end]
            for line in headers.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-type" and not value.strip().lower().startswith(
                    b"application/dicom"
                ):
                    raise ValueError(f"part of type {value.strip()!r}, expected application/dicom")
            self.buf = buf[2:] if not headers else buf[end + 4 :]
            self.state, self.part = "body", _Part()
            return True
        if self.state == "done":
            self.buf = b""  # the epilogue
        return False


def boundary_of(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"').encode("ascii")
    raise ValueError(f"no boundary in Content-Type {content_type!r}")


def stow_response(parts: list[ReceivedPart], retrieve_base: str) -> bytes:
    items = [
        {
            "00081150": {"vr": "UI", "Value": [p.sop_class_uid]},
            "00081155": {"vr": "UI", "Value": [p.sop_instance_uid]},
        }
        for p in parts
    ]
    return json.dumps({"00081190": {"vr": "UR", "Value": [retrieve_base]}, "00081199": {"vr": "SQ", "Value": items}})


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _answer(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self):
        """The request body in pieces of at most READ_SIZE bytes (chunked or Content-Length)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                while size:
                    piece = self.rfile.read(min(size, READ_SIZE))
                    if not piece:
                        raise ConnectionError("request body ended early")
                    size -= len(piece)
                    yield piece
                self.rfile.readline(1024)
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                piece = self.rfile.read(min(left, READ_SIZE))
                if not piece:
                    raise ConnectionError("request body ended early")
                left -= len(piece)
                yield piece

    def do_POST(self) -> None:  # noqa: N802
        self.server.sink.requests += 1
        try:
            reader = MultipartReader(boundary_of(self.headers.get("Content-Type", "")))
            pending = bytearray()
            for piece in self._body():
                pending += piece  # chunked bodies come in small chunks: parse a MiB at a time
                if len(pending) >= READ_SIZE:
                    reader.feed(bytes(pending))
                    pending = bytearray()
            reader.feed(bytes(pending))
            if reader.state != "done":
                raise ValueError("the body has no close delimiter")
        except (ValueError, ConnectionError) as e:
            self.server.sink.errors.append(str(e))
            self._answer(400, str(e).encode(), "text/plain")
            return
        self.server.sink.record(reader.parts)
        self._answer(200, stow_response(reader.parts, self.server.sink.stow_url).encode(), "application/dicom+json")


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    sink: "StowSink"


class StowSink:
    """Start with start(), point the daemon at `stow_url`, read `parts`, stop() at the end."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.parts: list[ReceivedPart] = []
        self.errors: list[str] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def stow_url(self) -> str:
        assert self._server is not None, "the sink was not started"
        return f"https://127.0.0.1:{self._server.server_address[1]}/dicom-web/studies"

    def record(self, parts: list[ReceivedPart]) -> None:
        with self._lock:
            self.parts.extend(parts)

    def start(self) -> StowSink:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        ctx.load_verify_locations(self.pki.ca_cert)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as the nginx front of Orthanc
        server = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=True)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        server.sink = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="stow-sink", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
