"""Normalised text, column-wise, in compiled code (numba): the form dedupe compares.

Normalisation: runs of whitespace (exactly Python's ``str.isspace`` set) become one
space, leading and trailing whitespace goes, and every code point is lower-cased on
its own (``chr(c).lower()``, so U+0130 becomes ``"i\\u0307"``). That is
``pipeline.core.ids.normalize_text(s).lower()`` except Python's context-dependent final
sigma (``"ΟΔΟΣ".lower()`` ends in ``ς``; here every ``Σ`` becomes ``σ``). Bytes that are
not valid UTF-8 pass through unchanged.

- ``normalize_texts(column)``: the normalised strings, as an Arrow column.
- ``text_keys(*columns)``: a 128-bit key per row, hashed from the normalised UTF-8 bytes
  of each column in turn (each column's byte length mixed in, so ``("ab", "c")`` and
  ``("a", "bc")`` differ). Nothing is materialised. Two rows share a key when their
  normalised texts are equal; different texts share one with probability about
  ``rows² / 2**129``.
- ``first_occurrences(k1, k2)``: per row, whether its key is seen for the first time.

Arrow buffers go to the kernels without copies, in pieces of a few MiB of text on a
few threads (the kernels release the GIL).
"""
from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_CASED_LIMIT = 0x20000  # no code point at or above this changes under str.lower()


def _tables() -> tuple[np.ndarray, ...]:
    lower = np.arange(_CASED_LIMIT, dtype=np.int32)
    extra = np.full(_CASED_LIMIT, -1, np.int32)  # a second code point (only U+0130 has one)
    for c in range(_CASED_LIMIT):
        low = chr(c).lower()
        if low != chr(c):
            lower[c] = ord(low[0])
            if len(low) > 1:
                (extra[c],) = map(ord, low[1:])
    space = np.zeros(0x3001, np.bool_)
    space[[c for c in range(0x3001) if chr(c).isspace()]] = True
    ascii_ws = space[:128].astype(np.uint8)
    ascii_out = np.array([32 if ascii_ws[b] else ord(chr(b).lower()) for b in range(128)], np.uint8)
    return lower, extra, space, ascii_out, ascii_ws


LOWER, EXTRA, SPACE, ASCII_OUT, ASCII_WS = _tables()
GROWTH = 2  # a normalised text is at most 1.5x its input bytes (U+0130: 2 bytes -> 3)

_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0xFF51AFD7ED558CCD)
_C4 = np.uint64(0xC4CEB9FE1A85EC53)
_S29, _S31, _S33 = np.uint64(29), np.uint64(31), np.uint64(33)
_0, _1, _2, _3, _4, _8 = (np.uint64(k) for k in (0, 1, 2, 3, 4, 8))
_SEED1, _SEED2 = np.uint64(0x243F6A8885A308D3), np.uint64(0x13198A2E03707344)


# Positions are uint64 inside the kernels: numba checks a signed index for wrap-around
# on every access (about 20% of the time here).


@numba.njit(cache=True, nogil=True, inline="always")
def _put(out, o, cp):
    """UTF-8 of code point ``cp`` at ``out[o:]``; the next position."""
    if cp < 0x80:
        out[o] = cp
        return o + _1
    if cp < 0x800:
        out[o] = 0xC0 | (cp >> 6)
        out[o + _1] = 0x80 | (cp & 0x3F)
        return o + _2
    if cp < 0x10000:
        out[o] = 0xE0 | (cp >> 12)
        out[o + _1] = 0x80 | ((cp >> 6) & 0x3F)
        out[o + _2] = 0x80 | (cp & 0x3F)
        return o + _3
    out[o] = 0xF0 | (cp >> 18)
    out[o + _1] = 0x80 | ((cp >> 12) & 0x3F)
    out[o + _2] = 0x80 | ((cp >> 6) & 0x3F)
    out[o + _3] = 0x80 | (cp & 0x3F)
    return o + _4


@numba.njit(cache=True, nogil=True)
def _norm_row(d, start, end, out, at, lower, extra, space, ascii_out, ascii_ws):
    """Normalise the UTF-8 bytes ``d[start:end]`` into ``out[at:]``; the position after them.

    ASCII bytes go without branches: each is written (whitespace as a space) and the
    position moves on unless it is whitespace after whitespace or at the start (``prev``
    starts as if a space was written); ``out[o]`` may be scribbled on. (Eight-byte SWAR
    windows were tried: slower here, the window test mispredicts on real text.)
    """
    i, e, o = np.uint64(start), np.uint64(end), np.uint64(at)
    o0 = o
    prev = _1  # the last character written is a space, or none is written yet
    while i < e:
        b = d[i]
        if b < 0x80:
            w = np.uint64(ascii_ws[b])
            out[o] = ascii_out[b]
            o += _1 - (w & prev)
            prev = w
            i += _1
            continue
        cp = -1
        n = _1
        if 0xC2 <= b <= 0xDF:
            if i + _1 < e and (d[i + _1] & 0xC0) == 0x80:
                cp, n = ((b & 0x1F) << 6) | (d[i + _1] & 0x3F), _2
        elif 0xE0 <= b <= 0xEF:
            if i + _2 < e and (d[i + _1] & 0xC0) == 0x80 and (d[i + _2] & 0xC0) == 0x80:
                cp, n = ((b & 0x0F) << 12) | ((d[i + _1] & 0x3F) << 6) | (d[i + _2] & 0x3F), _3
        elif (0xF0 <= b <= 0xF4 and i + _3 < e and (d[i + _1] & 0xC0) == 0x80 and (d[i + _2] & 0xC0) == 0x80
              and (d[i + _3] & 0xC0) == 0x80):
            cp = (((b & 0x07) << 18) | ((d[i + _1] & 0x3F) << 12) | ((d[i + _2] & 0x3F) << 6)
                  | (d[i + _3] & 0x3F))
            n = _4
        i += n
        if cp >= 0 and cp < space.shape[0] and space[cp]:
            out[o] = 32
            o += _1 - prev
            prev = _1
            continue
        prev = _0
        if cp < 0:  # not UTF-8: the byte as it is
            out[o] = b
            o += _1
        elif cp < lower.shape[0]:
            o = _put(out, o, lower[cp])
            if extra[cp] >= 0:
                o = _put(out, o, extra[cp])
        else:
            o = _put(out, o, cp)
    if prev and o > o0:  # a trailing space
        o -= _1
    return o


@numba.njit(cache=True, nogil=True)
def _normalize_kernel(d, off, out, out_off, lower, extra, space, ascii_out, ascii_ws):
    o = _0
    out_off[0] = 0
    for r in range(len(off) - 1):
        o = _norm_row(d, off[r], off[r + 1], out, o, lower, extra, space, ascii_out, ascii_ws)
        out_off[r + 1] = o


@numba.njit(cache=True, nogil=True, inline="always")
def _fmix(h):
    h ^= h >> _S33
    h *= _M3
    h ^= h >> _S33
    h *= _C4
    h ^= h >> _S33
    return h


@numba.njit(cache=True, nogil=True)
def _hash_kernel(d, off, k1, k2, lower, extra, space, ascii_out, ascii_ws):
    """Fold each row's normalised bytes into its key (``k1``, ``k2``), in place."""
    longest = 0
    for r in range(len(off) - 1):
        longest = max(longest, off[r + 1] - off[r])
    scratch = np.empty((longest * GROWTH) // 8 + 2, np.uint64)
    buf = scratch.view(np.uint8)
    for r in range(len(off) - 1):
        n = _norm_row(d, off[r], off[r + 1], buf, 0, lower, extra, space, ascii_out, ascii_ws)
        words = n // _8
        if n > words * _8:  # zero the bytes after the text in its last word
            for t in range(n, (words + _1) * _8):
                buf[t] = 0
            words += _1
        h1 = k1[r] ^ _SEED1
        h2 = k2[r] ^ _SEED2
        for w in range(words):
            x = scratch[w]
            h1 = (h1 ^ x) * _M1
            h1 ^= h1 >> _S29
            h2 = (h2 + x) * _M2
            h2 = (h2 << _S31) | (h2 >> _S33)
        length = n
        k1[r] = _fmix(h1 ^ (length * _M2))
        k2[r] = _fmix(h2 + length + _M1)


@numba.njit(cache=True, nogil=True)
def _first_kernel(k1, k2, mask):
    n = len(k1)
    t1 = np.zeros(mask + 1, np.uint64)
    t2 = np.zeros(mask + 1, np.uint64)
    used = np.zeros(mask + 1, np.bool_)
    first = np.zeros(n, np.bool_)
    for i in range(n):
        a, b = k1[i], k2[i]
        slot = np.int64(a & np.uint64(mask))
        while used[slot] and not (t1[slot] == a and t2[slot] == b):
            slot = (slot + 1) & mask
        if not used[slot]:
            used[slot] = True
            t1[slot], t2[slot] = a, b
            first[i] = True
    return first


def string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string array's UTF-8 bytes and int64 offsets into them, from 0 (nulls read as empty)."""
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros(1, np.int64)
    wide = pa.types.is_large_string(arr.type)
    offsets = np.frombuffer(arr.buffers()[1], np.int64 if wide else np.int32)[arr.offset : arr.offset + n + 1]
    base, end = int(offsets[0]), int(offsets[-1])
    off = offsets.astype(np.int64) - base
    if end == base:
        return np.zeros(0, np.uint8), off
    return np.frombuffer(arr.buffers()[2], np.uint8, count=end - base, offset=base), off


def _pieces(values: pa.Array | pa.ChunkedArray, target: int) -> list[pa.Array]:
    """Zero-copy slices of about ``target`` bytes of string data each (whole rows), in order."""
    out = []
    for arr in values.chunks if isinstance(values, pa.ChunkedArray) else [values]:
        if not len(arr):
            continue
        _, off = string_buffers(arr)
        cuts = np.unique(np.searchsorted(off, np.arange(target, int(off[-1]), target)))
        bounds = [0, *[int(c) for c in cuts if 0 < c < len(arr)], len(arr)]
        out += [arr.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    return out


def _map(fn, items: list) -> list:
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1, len(items))) as pool:
        return list(pool.map(fn, items))


def _normalize_piece(arr: pa.Array) -> pa.Array:
    d, off = string_buffers(arr)
    out = np.empty(len(d) * GROWTH + 8, np.uint8)
    out_off = np.empty(len(off), np.int64)
    _normalize_kernel(d, off, out, out_off, LOWER, EXTRA, SPACE, ASCII_OUT, ASCII_WS)
    return pa.LargeStringArray.from_buffers(len(arr), pa.py_buffer(out_off), pa.py_buffer(out[: out_off[-1]]))


def normalize_texts(values: pa.Array | pa.ChunkedArray, piece_bytes: int = 1 << 20) -> pa.ChunkedArray:
    """The normalised form of every string (null reads as ""), as a ``large_string`` column."""
    return pa.chunked_array(_map(_normalize_piece, _pieces(values, piece_bytes)), pa.large_string())


def _fold(col: pa.Array | pa.ChunkedArray, k1: np.ndarray, k2: np.ndarray, piece_bytes: int) -> None:
    """Fold the normalised bytes of ``col`` into each row's key, piece by piece on threads."""
    pieces = _pieces(col, piece_bytes)
    starts = np.cumsum([0] + [len(p) for p in pieces])

    def piece(j: int) -> None:
        d, off = string_buffers(pieces[j])
        a, b = starts[j], starts[j + 1]  # k1[a:b] is a view: the kernel writes through it
        _hash_kernel(d, off, k1[a:b], k2[a:b], LOWER, EXTRA, SPACE, ASCII_OUT, ASCII_WS)

    _map(piece, list(range(len(pieces))))


def text_keys(*columns: pa.Array | pa.ChunkedArray, piece_bytes: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """A 128-bit key (two uint64 arrays) per row of the normalised texts of ``columns`` together."""
    n = len(columns[0])
    k1, k2 = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
    for col in columns:
        if len(col) != n:
            raise ValueError(f"columns differ in length: {len(col)} != {n}")
        _fold(col, k1, k2, piece_bytes)
    return k1, k2


def first_occurrences(k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
    """Per row, True where its key (``k1[i]``, ``k2[i]``) appears for the first time."""
    n = len(k1)
    mask = (1 << max(4, (2 * n).bit_length())) - 1
    return _first_kernel(np.ascontiguousarray(k1, np.uint64), np.ascontiguousarray(k2, np.uint64), mask)
