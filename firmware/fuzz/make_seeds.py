#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target to corpus/<target>/ (a few valid inputs each).

    python3 firmware/fuzz/make_seeds.py

The seeds are committed; this script documents how they were made (pydicom for the data sets).
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
ILE, ELE, EBE, DEFL, JPEG = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50",
)


def item(t: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", t, 0, len(payload)) + payload


def pdu(t: int, body: bytes) -> bytes:
    return struct.pack(">BBI", t, 0, len(body)) + body


def assoc(t: int, contexts: bytes, calling: str = "CT1", called: str = "PASSERELLE") -> bytes:
    user = item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4.5.6") + item(0x55, b"SEED_010")
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
            + item(0x10, b"1.2.840.10008.3.1.1.1") + contexts + item(0x50, user))
    return pdu(t, body)


def rq_contexts() -> bytes:
    out = b""
    for pc_id, abstract, syntaxes in ((1, VERIFICATION, [ILE]), (3, CT, [ELE, ILE, JPEG]), (5, CT, [DEFL, EBE])):
        sub = item(0x30, abstract.encode()) + b"".join(item(0x40, s.encode()) for s in syntaxes)
        out += item(0x20, bytes([pc_id, 0, 0, 0]) + sub)
    return out


def ac_contexts() -> bytes:
    return item(0x21, bytes([1, 0, 0, 0]) + item(0x40, ILE.encode())) + item(0x21, bytes([3, 0, 3, 0]) + item(0x40, ELE.encode()))


def element(group: int, elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, elem, len(value)) + value


def uid(v: str) -> bytes:
    b = v.encode()
    return b + b"\0" if len(b) % 2 else b


def command(field: int, message_id: int, dataset: bool, sop_class: str, sop_instance: str | None) -> bytes:
    rest = element(0, 0x0002, uid(sop_class)) + element(0, 0x0100, struct.pack("<H", field))
    rest += element(0, 0x0110, struct.pack("<H", message_id))
    if field == 0x0001:
        rest += element(0, 0x0700, struct.pack("<H", 0))
    rest += element(0, 0x0800, struct.pack("<H", 0x0000 if dataset else 0x0101))
    if sop_instance:
        rest += element(0, 0x1000, uid(sop_instance))
    return element(0, 0x0000, struct.pack("<I", len(rest))) + rest


def pdata(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    return pdu(0x04, b"".join(struct.pack(">IBB", len(v) + 2, pc, ctl) + v for pc, ctl, v in pdvs))


def datasets() -> dict[str, bytes]:
    """One small CT data set per transfer syntax, written by pydicom."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "CT"
    ds.ReferencedImageSequence = [Dataset()]
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.9"
    ds.PatientID = "PAT-7"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.SeriesNumber = "1"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\x01\x00" * 4
    out = {}
    for name, little, implicit in (("implicit_le", True, True), ("explicit_le", True, False), ("explicit_be", False, False)):
        buf = io.BytesIO()
        fp = pydicom.filebase.DicomFileLike(buf)
        fp.is_little_endian, fp.is_implicit_VR = little, implicit
        write_dataset(fp, ds)
        out[name] = buf.getvalue()
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    out["deflated"] = deflater.compress(out["explicit_le"]) + deflater.flush()
    # Encapsulated pixel data after the leading elements (JPEG baseline context).
    encaps = out["explicit_le"][: out["explicit_le"].index(b"\xe0\x7f\x10\x00")]
    encaps += b"\xe0\x7f\x10\x00OB\0\0\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0" + struct.pack("<I", 0)
    encaps += b"\xfe\xff\x00\xe0" + struct.pack("<I", 4) + b"\xff\xd8\xff\xd9" + b"\xfe\xff\xdd\xe0" + bytes(4)
    out["jpeg"] = encaps
    return out


def write(target: str, name: str, data: bytes) -> None:
    d = HERE / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def main() -> None:
    echo = command(0x0030, 1, False, VERIFICATION, None)
    store = command(0x0001, 7, True, CT, "1.2.826.0.1.3680043.8.498.1")
    sets = datasets()

    # pdu: PDU streams as a peer sends them.
    rq = assoc(0x01, rq_contexts())
    write("pdu", "associate_rq", rq)
    write("pdu", "associate_ac", assoc(0x02, ac_contexts()))
    write("pdu", "associate_rj", pdu(0x03, bytes([0, 1, 1, 7])))
    write("pdu", "echo_session", rq + pdata([(1, 0x03, echo)]) + pdu(0x05, bytes(4)))
    write("pdu", "store_session", rq + pdata([(3, 0x03, store)]) + pdata([(3, 0x00, sets["explicit_le"][:40]),
                                                                        (3, 0x02, sets["explicit_le"][40:])]))
    write("pdu", "release_rp_abort", pdu(0x06, bytes(4)) + pdu(0x07, bytes([0, 0, 2, 0])))

    # pdv: [peer max PDU (u16 BE)] then [context id, control header, length (u16 BE), bytes]...
    def pdvs(items: list[tuple[int, int, bytes]], peer_max: int = 16384) -> bytes:
        return struct.pack(">H", peer_max) + b"".join(struct.pack(">BBH", pc, ctl, len(v)) + v for pc, ctl, v in items)

    write("pdv", "echo", pdvs([(1, 0x03, echo)]))
    write("pdv", "echo_fragmented_small_peer_pdu", pdvs([(1, 0x01, echo[:20]), (1, 0x03, echo[20:])], peer_max=16))
    write("pdv", "store", pdvs([(3, 0x03, store), (3, 0x00, sets["implicit_le"][:50]), (3, 0x02, sets["implicit_le"][50:])]))
    write("pdv", "two_echoes", pdvs([(1, 0x03, echo), (1, 0x03, command(0x0030, 2, False, VERIFICATION, None))]))

    # command: command sets.
    write("command", "c_echo_rq", echo)
    write("command", "c_store_rq", store)
    write("command", "c_find_rq", command(0x0020, 3, True, "1.2.840.10008.5.1.4.31", None))
    write("command", "c_cancel_rq", element(0, 0x0100, struct.pack("<H", 0x0FFF)) + element(0, 0x0120, struct.pack("<H", 7))
          + element(0, 0x0800, struct.pack("<H", 0x0101)))

    # leading: [transfer syntax pick] then the data set (see SYNTAXES in fuzz_targets/leading.rs).
    for pick, name in enumerate(("implicit_le", "explicit_le", "explicit_be", "deflated", "jpeg")):
        write("leading", name, bytes([pick]) + sets[name])

    # stow_response: [content type pick] then the body (see CONTENT_TYPES in fuzz_targets/stow_response.rs).
    tests = (REPO / "firmware/uplink/src/response/tests.rs").read_text()
    bodies = re.findall(r'r#"(.*?)"#', tests, re.S)
    json_bodies = [b for b in bodies if b.lstrip().startswith(("{", "["))][:4]
    xml_bodies = [b for b in bodies if b.lstrip().startswith("<")][:3]
    for i, b in enumerate(json_bodies):
        write("stow_response", f"json_{i}", bytes([0 if i % 2 == 0 else 3]) + b.encode())
    for i, b in enumerate(xml_bodies):
        write("stow_response", f"xml_{i}", bytes([1 if i % 2 == 0 else 2]) + b.encode())

    # config: the README's example and a minimal one.
    readme = (REPO / "README.md").read_text()
    for i, block in enumerate(re.findall(r"```toml\n(.*?)```", readme, re.S)[:3]):
        write("config", f"readme_{i}", block.encode())
    write("config", "minimal", b'[uplink]\nstow_url = "https://pacs.example/dicom-web/studies"\nca_file = "/etc/passerelle/ca.pem"\n')


if __name__ == "__main__":
    main()
