"""Content checksums for integrity checks: XXH3-64, the one fast hash every check of stored bytes uses.

XXH3 hashes from memory at several GB/s on one core (a ~0.7 MB compressed shard batch in ~17 us here, against
~2.2 ms to decode it), so checking every read costs under 1% of the read; sha256 (~0.5 GB/s) stays where a
cryptographic hash is wanted (a shard's identity in its manifest). XXH3 catches accidental damage (bit flips,
zeroed blocks, truncation); it is not meant to resist someone forging data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import xxhash

CHUNK = 1 << 24  # 16 MiB reads: large enough for full bandwidth on Lustre/GPFS, small enough not to matter in RAM


def xxh3_bytes(data: Any) -> str:  # any buffer-protocol object (collections.abc.Buffer is Python 3.12+)
    """Hex XXH3-64 of a bytes-like object (bytes, memoryview, numpy array, pyarrow Buffer)."""
    return xxhash.xxh3_64_hexdigest(data)


def xxh3_int(data: Any) -> int:
    """XXH3-64 of a bytes-like object as an integer: the form hot paths compare (no hex string made per call)."""
    return xxhash.xxh3_64_intdigest(data)


def xxh3_file(path: Path, chunk: int = CHUNK) -> str:
    """Hex XXH3-64 of a file's contents, read in chunks."""
    digest = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(chunk)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()
