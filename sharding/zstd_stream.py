"""Reading a `.jsonl.zst` input: frame-by-frame zstd decompression in small steps (sharding.readers)."""

from __future__ import annotations

import io
from typing import Any, BinaryIO

import zstandard

_ZSTD_STEP = 1 << 12  # compressed bytes per decompression call: bounds its output to ~128 MB even for a zstd bomb


class Truncated(Exception):
    """The compressed stream stops inside a frame (a cut-off copy), or is not zstd from some point on."""

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
