"""Ogg pages (RFC 3533): the checks libogg makes and then steps past, and where a chain's links start.

libogg drops a page whose CRC fails, or that the file's end cuts short, and decoding goes on: one
flipped byte loses a page of audio (seconds) without a word from libsndfile or FFmpeg. A chained Ogg
(links one after another, as ``cat a.ogg b.ogg`` or an internet-radio dump makes) decodes in
libsndfile up to the end of its first link only.
"""
from __future__ import annotations

import mmap
import os
import zlib

_BIT_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))
BOS, EOS = 2, 4  # header_type flags: a logical stream's first page, its last


def _reverse32(x: int) -> int:
    return int(f"{x:032b}"[::-1], 2)


def crc(data: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, most significant bit first, initial 0, no final xor).
    zlib's CRC-32 is the same polynomial bit-reflected: on bit-reversed bytes it computes the
    bit-reversed register; the xors undo the inversions it makes on the way in and out."""
    return _reverse32(zlib.crc32(data.translate(_BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF)


def links(path: str, verify: bool = True) -> list[tuple[int, int]] | None:
    """The byte ranges of a chained Ogg file's links (one for an unchained file), after checking
    every page's CRC (unless not ``verify``: only the pages' headers are read), its length against
    the file's, and that each logical stream's page numbers run on without a gap; None for a file
    that is not Ogg. ValueError names the first bad page."""
    try:
        f = open(path, "rb")
    except OSError:  # unreadable: the decoder reports it
        return None
    with f:
        if f.read(4) != b"OggS":
            return None
        f.seek(0)
        size, offset = os.fstat(f.fileno()).st_size, 0
        starts, previous_bos = [], False
        next_page = {}  # serial number -> the page number due next
        unended = set()  # streams whose last page (EOS) has not come yet
        in_headers = set()  # streams whose last page was a header page (granule position 0)
        while offset < size:
            header = f.read(27)
            if header[:4] != b"OggS":
                if not unended and _no_page_after(f, offset):
                    break  # a tag or padding after every stream's end (ID3v1, APE): decoders skip it, nothing is lost
                raise ValueError(f"{path}: truncated or corrupt Ogg file (no Ogg page at byte {offset}, where one "
                                 "was due)")
            table = f.read(header[26]) if len(header) == 27 else b""
            body_size = sum(table)
            if len(header) < 27 or len(table) < header[26] or offset + 27 + len(table) + body_size > size:
                raise ValueError(f"{path}: truncated or corrupt Ogg file (the page at byte {offset} runs past the "
                                 f"file's end at byte {size})")
            if header[4] != 0:
                raise ValueError(f"{path}: truncated or corrupt Ogg file (the page at byte {offset} has unknown "
                                 f"version {header[4]})")
            if verify:
                page = header[:22] + bytes(4) + header[26:] + table + f.read(body_size)  # its CRC field zeroed
                if crc(page) != int.from_bytes(header[22:26], "little"):
                    raise ValueError(f"{path}: truncated or corrupt Ogg file (the page at byte {offset} fails its CRC "
                                     "check)")
            else:
                f.seek(body_size, os.SEEK_CUR)
            flags, serial = header[5], int.from_bytes(header[14:18], "little")
            number, granule = int.from_bytes(header[18:22], "little"), int.from_bytes(header[6:14], "little")
            # A listener joining a live stream late (an Icecast dump) gets its header pages, then its pages
            # from where it is now: page numbers jump on once, past the header pages, with nothing lost
            joined = serial in in_headers and granule != 0
            if flags & BOS:
                if not previous_bos:  # the first of a link's start pages (one per multiplexed stream)
                    starts.append(offset)
            elif serial in next_page and number != next_page[serial] and not joined:
                raise ValueError(f"{path}: truncated or corrupt Ogg file (the page at byte {offset} is page {number} "
                                 f"of stream {serial:#010x}, where page {next_page[serial]} was due: pages are "
                                 "missing or out of order)")
            next_page[serial] = (number + 1) % 2**32
            if flags & EOS:
                unended.discard(serial)
            else:
                unended.add(serial)
            if granule == 0:
                in_headers.add(serial)
            else:
                in_headers.discard(serial)
            previous_bos = bool(flags & BOS)
            offset += 27 + len(table) + body_size
    if not starts or starts[0] != 0:  # a dump cut into a stream: its pages before the next start page
        starts.insert(0, 0)
    return list(zip(starts, starts[1:] + [size]))


def _no_page_after(f, offset: int) -> bool:
    """Whether no "OggS" follows offset: what is there is not a damaged page of a link to come."""
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(b"OggS", offset) < 0
