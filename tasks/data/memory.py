"""How the data stage keeps its memory flat in the input size: bit masks (``Bits``), mapped pages handed back."""

from __future__ import annotations

import ctypes
import functools
import mmap
from collections.abc import Iterable
from typing import Any

import numpy as np

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MAPS = "/proc/self/maps"
_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)  # np.bitwise_count: numpy 2 only


def release(ds: Any, names: Iterable[str], start: int, stop: int) -> None:
    """Drop the pages of the buffers holding rows ``[start, stop)`` of these columns from resident memory.

    Every page a pass reads from the memory-mapped dataset stays resident until the file is unmapped: 1 GB of
    text showed 2 GB of RSS (reclaimable, but counted by ``top`` and a container's limit). Such pages are clean:
    ``madvise(MADV_DONTNEED)`` drops them and a later read faults them in again from the page cache. A slice's
    buffers are its whole record batches', so neighbouring rows' pages go too. Only ranges inside read-only
    ``.arrow`` mappings (``/proc/self/maps``) are touched: memory the process owns is never released this way.
    """
    release_arrays(chunk for name in names for chunk in ds.data.column(name).slice(start, stop - start).chunks)


def release_arrays(arrays: Iterable[Any]) -> None:
    """``release`` for Arrow arrays (e.g. a ``map`` batch's columns, read from the input's memory map)."""
    maps = _read_only_file_maps()  # none without /proc (not Linux, a sandbox): then nothing is released
    libc = _libc() if maps else None
    if libc is None:
        return
    for array in arrays:
        for buf in filter(None, array.buffers()):  # a missing or empty buffer has no page
            low, high = buf.address, buf.address + buf.size
            first, last = -(-low // _PAGE) * _PAGE, high // _PAGE * _PAGE  # the whole pages inside the buffer
            if last > first and any(map_low <= low and high <= map_high for map_low, map_high in maps):
                libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _read_only_file_maps() -> list[tuple[int, int]]:
    try:
        with open(_MAPS, encoding="utf-8") as handle:
            rows = [line.split(maxsplit=5) for line in handle]
    except OSError:  # no /proc (a sandbox): nothing is known to be a file mapping, so nothing is released
        return []
    maps = []
    for fields in rows:  # an Arrow file mapped read-only: never a library's relocated (private, written) pages
        if len(fields) == 6 and fields[1].startswith("r-") and fields[5].rstrip("\n").endswith(".arrow"):
            low, high = fields[0].split("-")
            maps.append((int(low, 16), int(high, 16)))
    return maps


class Bits:
    """A mask of one bit per record: 28 M records hold 3.5 MB instead of the 28 MB of a bool array.

    Passes read and write it a chunk at a time (``get``/``put`` at multiples of 8); bits past the end stay 0.
    """

    def __init__(self, size: int) -> None:
        self.size, self.packed = size, np.zeros((size + 7) // 8, dtype=np.uint8)

    @classmethod
    def of(cls, mask: np.ndarray) -> Bits:
        """A bool array's bits."""
        bits = cls(len(mask))
        bits.packed[:] = np.packbits(mask)
        return bits

    def __len__(self) -> int:
        return self.size

    def get(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Records ``[start, stop)`` as a bool array."""
        stop = self.size if stop is None else min(stop, self.size)
        skip = start % 8
        bits = np.unpackbits(self.packed[start // 8 : (stop + 7) // 8], count=skip + max(stop - start, 0))
        return bits[skip:].view(bool)

    def put(self, start: int, mask: np.ndarray) -> None:
        """Overwrite records ``[start, start + len(mask))`` with a bool array, whole bytes at a time.

        Raises:
            ValueError: ``start`` is not a multiple of 8, or the mask ends inside a byte before the last record.
        """
        end = start + len(mask)
        if start % 8 or (end % 8 and end < self.size):
            raise ValueError(f"Bits.put({start}, {len(mask)} records): whole bytes only (a chunk of 8k records)")
        self.packed[start // 8 : (end + 7) // 8] = np.packbits(mask)

    def set(self, seq: np.ndarray) -> None:
        """Set the bits of records ``seq``."""
        seq = np.asarray(seq, dtype=np.int64)
        np.bitwise_or.at(self.packed, seq >> 3, (128 >> (seq & 7)).astype(np.uint8))

    def drop(self, other: Bits) -> int:
        """Clear every bit ``other`` has set; returns how many ``other`` has."""
        self.packed &= ~other.packed
        return other.count()

    def count(self) -> int:
        """Bits set."""
        return int(_POPCOUNT[self.packed].sum(dtype=np.int64))
