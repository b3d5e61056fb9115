"""Part-10 file helpers for the byte-identity check: the dataset bytes that follow the file meta group."""

from __future__ import annotations

import struct
from pathlib import Path

PREAMBLE_AND_MAGIC = 132
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


class NotPart10(ValueError):
    pass


def meta_end_offset(data: bytes) -> int:
    """Offset of the first byte after the file meta group (0002,xxxx) of a Part-10 file.

    Uses the group length (0002,0000) when it comes first, as the standard requires; otherwise walks the
    group's elements (always explicit VR little endian).
    """
    if len(data) < PREAMBLE_AND_MAGIC + 12 or data[128:132] != b"DICM":
        raise NotPart10("no 128-byte preamble followed by 'DICM'")
    group, elem = struct.unpack_from("<HH", data, PREAMBLE_AND_MAGIC)
    vr = data[PREAMBLE_AND_MAGIC + 4 : PREAMBLE_AND_MAGIC + 6]
    if (group, elem) == (0x0002, 0x0000) and vr == b"UL":
        (length,) = struct.unpack_from("<H", data, PREAMBLE_AND_MAGIC + 6)
        if length != 4:
            raise NotPart10(f"(0002,0000) has length {length}, expected 4")
        (group_length,) = struct.unpack_from("<I", data, PREAMBLE_AND_MAGIC + 8)
        end = PREAMBLE_AND_MAGIC + 12 + group_length
        if end > len(data):
            raise NotPart10("meta group length points past the end of the file")
        # The element after the group must not belong to group 0002 any more.
        if end + 2 <= len(data) and struct.unpack_from("<H", data, end)[0] == 0x0002:
            raise NotPart10("meta group length is too short: group 0002 goes on after it")
        return end
    return _walk_meta(data)


def _walk_meta(data: bytes) -> int:
    pos = PREAMBLE_AND_MAGIC
    while pos + 8 <= len(data):
        group, _ = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            return pos
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return pos


def dataset_bytes(data: bytes) -> bytes:
    """The dataset after group 0002, byte for byte."""
    return data[meta_end_offset(data) :]


def file_dataset_bytes(path: Path) -> bytes:
    return dataset_bytes(Path(path).read_bytes())


def meta_transfer_syntax(data: bytes) -> str:
    """(0002,0010) Transfer Syntax UID of a Part-10 file."""
    end = meta_end_offset(data)
    pos = PREAMBLE_AND_MAGIC
    while pos < end:
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            value_at = pos + 8
        if (group, elem) == (0x0002, 0x0010):
            return data[value_at : value_at + length].rstrip(b"\0 ").decode("ascii")
        pos = value_at + length
    raise NotPart10("no (0002,0010) Transfer Syntax UID")
