"""Server certificates made to be refused: an expired one from the test CA (right host names), made with
`openssl ca`, which can set any validity period."""

from __future__ import annotations

from pathlib import Path

from harness.pki import SERVER_EXT, Pki
from harness.util import run

CA_CONF = """[ ca ]
default_ca = test_ca
[ test_ca ]
database = {d}/index.txt
new_certs_dir = {d}
serial = {d}/serial
default_md = sha256
policy = any_name
unique_subject = no
copy_extensions = none
[ any_name ]
commonName = supplied
"""


def expired_server_cert(pki: Pki, d: Path) -> tuple[Path, Path]:
    """A certificate for localhost/127.0.0.1 from the test CA that expired in 2021."""
    d.mkdir(parents=True, exist_ok=True)
    key, csr, cert, ext, conf = (d / n for n in ("expired.key", "expired.csr", "expired.pem", "expired.ext", "ca.cnf"))
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    ext.write_text(SERVER_EXT)
    conf.write_text(CA_CONF.format(d=d))
    run(["openssl", "genrsa", "-out", str(key), "2048"], timeout=60)
    run(["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=localhost", "-out", str(csr)], timeout=60)
    run(["openssl", "ca", "-batch", "-notext", "-config", str(conf), "-cert", str(pki.ca_cert),
         "-keyfile", str(pki.ca_key), "-in", str(csr), "-out", str(cert), "-extfile", str(ext),
         "-startdate", "20200101000000Z", "-enddate", "20210101000000Z"], timeout=60)  # fmt: skip
    return cert, key
