"""Small but real media files for fakes to return: a PNG, and MP3 and MP4 stand-ins."""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    """A valid solid-colour PNG (8-bit RGB), built without an imaging library."""
    row = b"\x00" + bytes(rgb) * width  # filter byte 0, then the pixels
    raw = zlib.compress(row * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", raw) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def mp3_bytes(seed: str = "") -> bytes:
    """An ID3 tag and one silent MPEG-1 Layer III frame: enough for a file-type sniff."""
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x00"
    frame = b"\xff\xfb\x90\x64" + bytes(413)  # 128 kbit/s, 44.1 kHz frame is 417 bytes
    return tag + frame + seed.encode()[:64]


def mp4_bytes(seed: str = "") -> bytes:
    """An ISO BMFF `ftyp` box followed by an empty `mdat`: sniffs as MP4."""
    ftyp = struct.pack(">I", 24) + b"ftypmp42" + struct.pack(">I", 0) + b"mp42isom"
    payload = seed.encode()[:64]
    mdat = struct.pack(">I", 8 + len(payload)) + b"mdat" + payload
    return ftyp + mdat
