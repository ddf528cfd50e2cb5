"""Fixed-width bit packing: ``count`` codes of ``bits`` bits each in ceil(count * bits / 8) bytes, most significant
bit first, the last byte padded with zeros.

Eight codes of ``bits`` bits fill exactly ``bits`` bytes, so codes are handled in groups of eight: each of a
group's eight code positions touches a fixed handful of its bytes, and one vectorised shift per (code position,
byte) pair moves that part of every group at once.  Memory stays linear in the codes and the segment (no
count x bits bit matrix), and it is several times faster than unpacking bits.
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 63  # codes are int64


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Codes in [0, 2**bits) -> bytes (checked: a code that does not fit raises ValueError)."""
    codes = np.ascontiguousarray(codes, dtype=np.int64).reshape(-1)
    _check_bits(bits)
    if bits == 0 or codes.size == 0:
        if codes.size and codes.any():
            raise ValueError("a one-code layer holds only index 0")
        return b""
    if codes.min() < 0 or codes.max() >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack in {bits} bits, found "
                         f"[{codes.min()}, {codes.max()}]")
    if bits % 8 == 0:  # whole bytes: a big-endian view
        width = bits // 8
        wide = codes.astype(">u8").view(np.uint8).reshape(-1, 8)
        return wide[:, 8 - width:].tobytes()
    if bits == 1:
        return np.packbits(codes.astype(np.uint8)).tobytes()
    padded = np.zeros(-(-codes.size // 8) * 8, dtype=np.uint64)
    padded[:codes.size] = codes
    positions = np.ascontiguousarray(padded.reshape(-1, 8).T)  # (8, groups): each code position contiguous
    out, part = np.zeros((bits, positions.shape[1]), dtype=np.uint8), np.empty(positions.shape[1], np.uint64)
    for position, byte, shift in _spans(bits):
        _shift(positions[position], shift, part)
        np.bitwise_or(out[byte], part.astype(np.uint8), out=out[byte])  # the cast keeps the low 8 bits
    return np.ascontiguousarray(out.T).reshape(-1)[:packed_size(codes.size, bits)].tobytes()


def unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    """The inverse of ``pack``: ``count`` int64 codes (``data`` must hold exactly packed_size(count, bits))."""
    _check_bits(bits)
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
    if bits == 1:
        return np.unpackbits(raw, count=count).astype(np.int64)
    grid = np.zeros((-(-count // 8), bits), dtype=np.uint8)
    grid.reshape(-1)[:len(raw)] = raw
    rows = np.ascontiguousarray(grid.T)  # (bits, groups): each byte of the groups contiguous
    codes, part = np.zeros((8, rows.shape[1]), dtype=np.uint64), np.empty(rows.shape[1], np.uint64)
    for position, byte, shift in _spans(bits):
        np.copyto(part, rows[byte], casting="unsafe")
        _shift(part, -shift, part)
        np.bitwise_or(codes[position], part, out=codes[position])
    codes &= np.uint64((1 << bits) - 1)  # the bits of neighbouring codes that shared a first byte
    return np.ascontiguousarray(codes.T).reshape(-1)[:count].view(np.int64)


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _spans(bits: int) -> list[tuple[int, int, int]]:
    """(code position in a group of 8, byte of the group, shift) for every byte a code touches: the code's bits
    that land in that byte are ``code >> shift`` (``<< -shift`` when the code ends inside the byte)."""
    spans = []
    for position in range(8):
        first, end = position * bits, (position + 1) * bits  # the code's bits within the group, MSB first
        for byte in range(first // 8, (end - 1) // 8 + 1):
            spans.append((position, byte, end - 8 * (byte + 1)))
    return spans


def _shift(values: np.ndarray, right: int, out: np.ndarray) -> None:
    """out = values >> right (values << -right for a negative ``right``), uint64, in place."""
    if right >= 0:
        np.right_shift(values, np.uint64(right), out=out)
    else:
        np.left_shift(values, np.uint64(-right), out=out)


def _check_bits(bits: int) -> None:
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bits must lie in [0, {MAX_BITS}], got {bits}")
