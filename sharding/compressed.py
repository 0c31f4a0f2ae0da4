"""Reading compressed JSONL inputs (sharding.readers): `.jsonl.zst` frame by frame, `.jsonl.gz` (and `.json.gz`, the
name C4 and others give gzipped JSON Lines) member by member, both in small steps, both telling a cut-off or
corrupt file from a clean end."""

from __future__ import annotations

import io
import zlib
from typing import Any, BinaryIO

import zstandard

_ZSTD_STEP = 1 << 12  # compressed bytes per decompression call: bounds its output to ~128 MB even for a zstd bomb
_GZIP_OUT = 1 << 20  # most decompressed bytes per gzip call, whatever the input's ratio (a gzip bomb)


class Truncated(Exception):
    """The compressed stream stops inside a frame or member (a cut-off copy), or is not zstd or gzip from some
    point on (`corrupt`)."""

    def __init__(self, message: str, corrupt: bool) -> None:
        super().__init__(message)
        self.corrupt = corrupt


class ZstdRaw(io.RawIOBase):
    """Frame-by-frame zstd decompression in small steps.

    python-zstandard's stream_reader reports a cut-off file as a clean end of file and stops at the
    first frame of a multi-frame file; this notices both.
    """

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj = self._dctx.decompressobj()
        self._in_frame = False  # the current frame has been fed input but not finished
        self._out = memoryview(b"")
        self.produced = 0  # decompressed bytes so far: none means the file is not zstd at all

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            chunk = self._source.read(_ZSTD_STEP)
            if not chunk:
                if self._in_frame:
                    raise Truncated("the last zstd frame is cut off", corrupt=False)
                return 0
            try:
                self._out = memoryview(self._feed(chunk))
            except zstandard.ZstdError as e:
                raise Truncated(f"zstd: {' '.join(str(e).split())[:160]}", corrupt=True) from None
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        self.produced += n
        return n

    def _feed(self, chunk: bytes) -> bytes:
        parts = []
        while chunk:
            parts.append(self._dobj.decompress(chunk))
            self._in_frame = not self._dobj.eof
            if self._in_frame:
                break
            chunk = self._dobj.unused_data  # the next frame starts inside this chunk
            self._dobj = self._dctx.decompressobj()
        return b"".join(parts)


class GzipRaw(io.RawIOBase):
    """gzip decompression in bounded steps, every member of a multi-member file (as `zcat` reads it: `cat a.gz b.gz`
    is one stream). Python's gzip module raises EOFError for a cut-off file and BadGzipFile or zlib.error for
    damage, in the middle of a read; here both become Truncated, with `produced` telling "not gzip at all" apart."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._dobj = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer
        self._pending = b""  # compressed input not yet fed (the output bound stopped the last call)
        self._in_member = False
        self._out = memoryview(b"")
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            if not self._pending:
                self._pending = self._source.read(_ZSTD_STEP)
                if not self._pending:
                    if self._in_member:
                        raise Truncated("the last gzip member is cut off", corrupt=False)
                    return 0
            try:
                self._out = memoryview(self._dobj.decompress(self._pending, _GZIP_OUT))
            except zlib.error as e:
                raise Truncated(f"gzip: {e}", corrupt=True) from None
            self._in_member = True
            self._pending = self._dobj.unconsumed_tail
            if self._dobj.eof:  # a member ended: the next one (if any) starts in its unused data
                self._pending, self._in_member = self._dobj.unused_data, False
                self._dobj = zlib.decompressobj(wbits=31)
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        self.produced += n
        return n
