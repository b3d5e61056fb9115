"""Test PKI made with the openssl CLI: a CA, a server certificate for localhost/127.0.0.1 (and 10.0.2.2,
the host as the power-cut test's QEMU guest reaches it), a client
certificate for mutual TLS, and a second, unrelated CA for negative tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .util import run


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_ca_key: Path
    # A server certificate signed by the other CA (same names), for tests that need one.
    other_server_cert: Path
    other_server_key: Path
    # A server certificate from the real CA for another host name only (pacs.example.org).
    wrong_name_cert: Path
    wrong_name_key: Path


def _openssl(*args: str | Path) -> None:
    run(["openssl", *map(str, args)], timeout=60)


def _make_ca(d: Path, name: str, cn: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("genrsa", "-out", key, "2048")
    _openssl(
        "req", "-x509", "-new", "-key", key, "-sha256", "-days", "365", "-subj", f"/CN={cn}", "-out", cert,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    return cert, key


def _make_leaf(d: Path, name: str, cn: str, ca_cert: Path, ca_key: Path, ext: str,
               days: int = 365) -> tuple[Path, Path]:
    key, csr, cert, extfile = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    extfile.write_text(ext)
    _openssl("genrsa", "-out", key, "2048")
    _openssl("req", "-new", "-key", key, "-subj", f"/CN={cn}", "-out", csr)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-days", str(days),
        "-sha256", "-extfile", extfile, "-out", cert,
    )
    return cert, key


SERVER_EXT = """basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:10.0.2.2
"""

WRONG_NAME_EXT = SERVER_EXT.replace("DNS:localhost,IP:127.0.0.1,IP:10.0.2.2", "DNS:pacs.example.org")

CLIENT_EXT = """basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
"""


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _make_ca(d, "ca", "Passerelle Test Regional CA")
    server_cert, server_key = _make_leaf(d, "server", "localhost", ca_cert, ca_key, SERVER_EXT)
    client_cert, client_key = _make_leaf(d, "client", "passerelle-test-gateway", ca_cert, ca_key, CLIENT_EXT)
    other_ca_cert, other_ca_key = _make_ca(d, "other-ca", "Unrelated Test CA")
    other_server_cert, other_server_key = _make_leaf(
        d, "other-server", "localhost", other_ca_cert, other_ca_key, SERVER_EXT
    )
    wrong_name_cert, wrong_name_key = _make_leaf(
        d, "wrong-name", "pacs.example.org", ca_cert, ca_key, WRONG_NAME_EXT
    )
    return Pki(
        dir=d,
        ca_cert=ca_cert,
        ca_key=ca_key,
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        other_ca_cert=other_ca_cert,
        other_ca_key=other_ca_key,
        other_server_cert=other_server_cert,
        other_server_key=other_server_key,
        wrong_name_cert=wrong_name_cert,
        wrong_name_key=wrong_name_key,
    )


def make_client_cert(pki: Pki, d: Path, name: str, *, foreign_ca: bool = False,
                     expired: bool = False, days: int = 365) -> tuple[Path, Path]:
    """Another client certificate for mutual TLS: issued by the unrelated CA (`foreign_ca`), or by the
    real CA but already expired (`expired`: valid until a day before it was issued), or valid for `days`."""
    d.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = (pki.other_ca_cert, pki.other_ca_key) if foreign_ca else (pki.ca_cert, pki.ca_key)
    return _make_leaf(d, name, "passerelle-test-gateway", ca_cert, ca_key, CLIENT_EXT, days=-1 if expired else days)


def make_self_signed_server_cert(d: Path, name: str, *, ca_false: bool) -> tuple[Path, Path]:
    """A self-signed server certificate for localhost/127.0.0.1, made as PACS set-up guides make one
    (`openssl req -x509`, whose default configuration marks it CA:TRUE), or with CA:FALSE (`ca_false`)."""
    d.mkdir(parents=True, exist_ok=True)
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    extra = ["-addext", "basicConstraints=critical,CA:FALSE"] if ca_false else []
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "30",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", *extra)
    return cert, key
