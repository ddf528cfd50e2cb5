"""Fixed-width bit packing: ``count`` codes of ``bits`` bits each in ceil(count * bits / 8) bytes, most significant
bit first, the last byte padded with zeros."""

from __future__ import annotations

import numpy as np


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Codes in [0, 2**bits) -> bytes (checked: a code that does not fit raises ValueError)."""
    codes = np.ascontiguousarray(codes, dtype=np.int64).reshape(-1)
    if bits == 0 or codes.size == 0:
        if codes.size and codes.any():
            raise ValueError("a one-code layer holds only index 0")
        return b""
    if codes.min() < 0 or codes.max() >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack in {bits} bits, found "
                         f"[{codes.min()}, {codes.max()}]")
    if bits % 8 == 0:  # whole bytes: a big-endian view, no bit matrix
        width = bits // 8
        wide = codes.astype(">u8").view(np.uint8).reshape(-1, 8)
        return wide[:, 8 - width:].tobytes()
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    matrix = ((codes[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(matrix.reshape(-1)).tobytes()


def unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    """The inverse of ``pack``: ``count`` int64 codes (``data`` must hold exactly packed_size(count, bits))."""
    if len(data) != packed_size(count, bits):
        raise ValueError(f"{count} codes of {bits} bits take {packed_size(count, bits)} bytes, got {len(data)}")
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits % 8 == 0:
        width = bits // 8
        wide = np.zeros((count, 8), dtype=np.uint8)
        wide[:, 8 - width:] = raw.reshape(count, width)
        return wide.view(">u8").reshape(-1).astype(np.int64)
    matrix = np.unpackbits(raw, count=count * bits).reshape(count, bits).astype(np.int64)
    return matrix @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8
