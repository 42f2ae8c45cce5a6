"""The compiled normalisation and exact-dedupe keys (stages.common.textnorm) against Python."""
import random

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.ids import normalize_text
from stages.common.textnorm import first_occurrences, normalize_texts, text_keys

# every character str.isspace() calls whitespace, control characters that are not, cased
# multi-byte text (U+0130 lowers to two code points, Ⱥ grows from 2 to 3 bytes, Deseret is 4 bytes)
ALPHABET = (list("aBc Z9é→…ÉİΣⱯȺ") + [c for c in map(chr, range(0x3001)) if c.isspace()]
            + ["\r\n", "  ", "\x01", "\x1b", "\x7f", "\u200b", "\ufeff", "\U00010400", "\U0001F600"])


def reference(text: str | None) -> str:
    """What the kernels compute: normalize_text, then each code point lower-cased on its own."""
    return "".join(ch.lower() for ch in normalize_text(text or ""))


def random_texts(n: int, seed: int = 0) -> list[str | None]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 15))) for _ in range(n)] + ["", None]


def test_normalize_texts_matches_python():
    texts = random_texts(5000)
    want = [reference(t) for t in texts]
    assert want != [normalize_text(t or "") for t in texts]  # the alphabet exercises lower-casing
    for piece_bytes in (1 << 20, 64):
        for typ in (pa.string(), pa.large_string()):
            arr = pa.array(texts, typ)
            got = normalize_texts(pa.chunked_array([arr.slice(0, 1234), arr.slice(1234)]), piece_bytes)
            assert got.to_pylist() == want
    # the one place it is not str.lower(): every capital sigma becomes σ, final or not
    assert normalize_texts(pa.array(["ΟΔΟΣ  İ"])).to_pylist() == ["οδοσ i\u0307"] != ["ΟΔΟΣ İ".lower()]


def test_invalid_utf8_passes_through_without_crashing():
    raw = [b"A\xff  B", b"\xe2\x82", b" \xf0\x9f\x98", b"ok\xc3"]  # a stray byte, truncated sequences
    data = b"".join(raw)
    offsets = np.cumsum([0] + [len(r) for r in raw]).astype(np.int32)
    arr = pa.StringArray.from_buffers(len(raw), pa.py_buffer(offsets), pa.py_buffer(data))
    got = normalize_texts(arr).cast(pa.large_binary()).to_pylist()
    assert got == [b"a\xff b", b"\xe2\x82", b"\xf0\x9f\x98", b"ok\xc3"]
    k1, k2 = text_keys(arr)
    assert len(set(zip(k1.tolist(), k2.tolist()))) == 4


def test_keys_equal_exactly_when_normalised_texts_are_equal():
    rng = random.Random(1)
    base = [t for t in random_texts(3000, seed=2) if t]
    prompts, completions = [], []
    for _ in range(20000):  # many rows that differ only in whitespace or case, some that are identical
        p, c = rng.choice(base[:20]), rng.choice(base[:200])
        if rng.random() < 0.3:
            c = " " + c.replace(" ", "\t \n", 1).upper() + "\u3000"
        prompts.append(p)
        completions.append(c)
    k1, k2 = text_keys(pa.array(prompts), pa.chunked_array([pa.array(completions[:777]), pa.array(completions[777:])]))
    by_key: dict = {}
    by_text: dict = {}
    for i, (p, c) in enumerate(zip(prompts, completions)):
        by_key.setdefault((int(k1[i]), int(k2[i])), []).append(i)
        by_text.setdefault((reference(p), reference(c)), []).append(i)
    assert len(by_text) < len(prompts) // 2  # plenty of duplicates to find
    assert sorted(by_key.values()) == sorted(by_text.values())

    seen: set = set()
    want = []
    for key in zip(map(reference, prompts), map(reference, completions)):
        want.append(key not in seen)
        seen.add(key)
    assert first_occurrences(k1, k2).tolist() == want


def test_keys_hash_the_normalised_text_of_each_column_in_turn():
    texts = random_texts(2000, seed=3)
    raw = text_keys(pa.array(texts))
    normalised = text_keys(pa.array([reference(t) for t in texts], pa.large_string()))
    small_pieces = text_keys(pa.array(texts), piece_bytes=100)
    for got in (normalised, small_pieces):
        assert np.array_equal(raw[0], got[0]) and np.array_equal(raw[1], got[1])
    # column boundaries and order count: ("ab", "c") is not ("a", "bc"), nor ("c", "ab")
    a, b = pa.array(["ab", "a", "c"]), pa.array(["c", "bc", "ab"])
    k1, k2 = text_keys(a, b)
    assert len(set(zip(k1.tolist(), k2.tolist()))) == 3
    with pytest.raises(ValueError, match="differ in length"):
        text_keys(a, pa.array(["x"]))


def test_empty_and_all_null_columns():
    assert normalize_texts(pa.array([], pa.string())).to_pylist() == []
    k1, k2 = text_keys(pa.array([None, None, "", " \n "], pa.string()))
    assert len(set(zip(k1.tolist(), k2.tolist()))) == 1
    assert first_occurrences(k1, k2).tolist() == [True, False, False, False]
    assert first_occurrences(np.zeros(0, np.uint64), np.zeros(0, np.uint64)).tolist() == []
