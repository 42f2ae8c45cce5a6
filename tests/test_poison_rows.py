"""Poison rows in a prompt source (JSONL and Parquet, local and S3): every good row comes out,
every bad row is quarantined with a specific reason, nothing is lost, the stage does not fail."""
import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import output_rows, run_stages


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


OK = "ok"
# (raw JSONL line, expected): (OK, prompt, answer) or a quarantine reason; a reason ending in
# "..." is a prefix (the rest names a column or a parser message)
JSONL = [
    (b"\xef\xbb\xbf" + _j({"question": "What is 1 + 1?", "answer": "2"}), (OK, "What is 1 + 1?", "2")),  # BOM
    (b'{"question": "bad \xff bytes", "answer": "1"}', "invalid UTF-8: invalid start byte at byte 18"),
    (b'{"question": "lone \\ud800 surrogate", "answer": "1"}', "invalid Unicode in prompt field 'question': lone surrogate"),
    (b'{"question": "surrogate answer?", "answer": "\\udfff"}', "invalid Unicode in answer field 'answer': lone surrogate"),
    (b'{"question": "Surrogate only in metadata?", "answer": "3", "note": "\\udc80"}',
     (OK, "Surrogate only in metadata?", "3")),
    (_j({"answer": "1"}), "missing prompt field 'question'"),
    (_j({"question": "No answer?"}), "missing answer field 'answer'"),
    (_j({"question": 42, "answer": "1"}), "wrong type for prompt field 'question': int, expected a string"),
    (_j({"question": 4.5, "answer": "1"}), "wrong type for prompt field 'question': float, expected a string"),
    (_j({"question": ["a", "b"], "answer": "1"}), "wrong type for prompt field 'question': list, expected a string"),
    (_j({"question": {"text": "x"}, "answer": "1"}), "wrong type for prompt field 'question': dict, expected a string"),
    (_j({"question": True, "answer": "1"}), "wrong type for prompt field 'question': bool, expected a string"),
    (_j({"question": None, "answer": "1"}), "empty prompt field 'question'"),
    (_j({"question": "", "answer": "1"}), "empty prompt field 'question'"),
    (_j({"question": " \t ", "answer": "1"}), "empty prompt field 'question'"),
    (b'{"question": NaN, "answer": "1"}', "empty prompt field 'question'"),
    (_j({"question": "List answer?", "answer": ["1", "2"]}),
     "wrong type for answer field 'answer': list, expected a string or a number"),
    (_j({"question": "Bool answer?", "answer": False}),
     "wrong type for answer field 'answer': bool, expected a string or a number"),
    (_j({"question": "Null answer?", "answer": None}), "empty answer field 'answer'"),
    (_j({"question": "Integer answer?", "answer": 7}), (OK, "Integer answer?", "7")),
    (_j({"question": "Float answer?", "answer": 0.25}), (OK, "Float answer?", "0.25")),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'"just a string"', "expected a JSON object, got str"),
    (b"17", "expected a JSON object, got int"),
    (b'{"question": "truncated", ', "invalid JSON: ..."),
    (b'{"question": ' + b"[" * 100_000 + b"]" * 100_000 + b', "answer": "1"}', "invalid JSON: nested too deeply"),
    (b'{"question": "Huge integer?", "answer": ' + b"9" * 5000 + b"}", "invalid JSON: ..."),
    (b"", None),  # a blank line: not a row, counted as blank
    (_j({"question": "CRLF line?", "answer": "5"}) + b"\r", (OK, "CRLF line?", "5")),
    (_j({"question": "What is  1 + 1?", "answer": "2"}), "duplicate prompt (same as src/a#1)"),
    (_j({"question": "Unicode ✓ é 中文 \u0000 ok?", "answer": "π"}), (OK, "Unicode ✓ é 中文 \u0000 ok?", "π")),
]


def _bad_utf8_strings(values: list[bytes | None]) -> pa.Array:
    """A string array holding bytes as they are (pyarrow does not validate them on write)."""
    offsets, data, pos = [0], b"", 0
    for v in values:
        data += v or b""
        pos += len(v or b"")
        offsets.append(pos)
    validity = pa.array([v is not None for v in values]).buffers()[1]
    return pa.Array.from_buffers(pa.string(), len(values), [validity, pa.array(offsets, pa.int32()).buffers()[1],
                                                            pa.py_buffer(data)])


# file name -> (table, expected per row)
def _parquet_files() -> dict[str, tuple[pa.Table, list]]:
    return {
        "b.parquet": (pa.table({
            "question": _bad_utf8_strings([b"Parquet good?", None, b"", b"   ", b"bad \xff here", b"Parquet no answer?",
                                           b"What is 1 + 1?"]),
            "answer": ["1", "1", "1", "1", "1", None, "2"],
            "level": [1, 2, 3, 4, 5, 6, 7],
        }), [(OK, "Parquet good?", "1"), "empty prompt field 'question'", "empty prompt field 'question'",
             "empty prompt field 'question'", "invalid UTF-8 in field 'question'", "empty answer field 'answer'",
             "duplicate prompt (same as src/a#1)"]),
        "c.parquet": (pa.table({"question": pa.array([1, 2], pa.int64()), "answer": ["1", "2"]}),
                      ["wrong type for prompt field 'question': int, expected a string"] * 2),
        "d.parquet": (pa.table({"question": pa.array([["a"], []], pa.list_(pa.string())), "answer": ["1", "2"]}),
                      ["wrong type for prompt field 'question': list, expected a string"] * 2),
        "e.parquet": (pa.table({"prompt": ["x?", "y?"], "answer": ["1", "2"]}), ["missing prompt field 'question'"] * 2),
        "f.parquet": (pa.table({"question": ["Parquet float?", "Parquet NaN?"], "answer": [4.5, float("nan")]}),
                      [(OK, "Parquet float?", "4.5"), "empty answer field 'answer'"]),
        "g.parquet": (pa.table({"question": ["Parquet bool?"], "answer": [True]}),
                      ["wrong type for answer field 'answer': bool, expected a string or a number"]),
        "h.parquet": (pa.table({"question": ["Parquet other bad notes?"], "answer": ["6"],
                                "notes": _bad_utf8_strings([b"\xc3\x28"])}),
                      ["invalid UTF-8 in field 'notes'"]),
    }


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(folder for the source files, storage root)."""
    if request.param == "local":
        return str(tmp_path / "src"), str(tmp_path / "root")
    base = f"s3://{request.getfixturevalue('moto_s3_bucket')}/{uuid.uuid4().hex[:8]}"
    return f"{base}/src", f"{base}/root"


def test_poison_rows_are_quarantined_with_reasons(ray_local, tmp_path, where):
    src, root = where
    fs, src_path = fsspec.core.url_to_fs(src)
    fs.makedirs(src_path, exist_ok=True)
    with fs.open(f"{src_path}/a.jsonl", "wb") as f:
        f.write(b"\n".join(line for line, _ in JSONL) + b"\n")
    expected: dict[tuple[str, int], object] = {}
    for i, (_, want) in enumerate(JSONL, start=1):
        if want is not None:
            expected[("src/a", i)] = want
    parquet = _parquet_files()
    for name, (table, wants) in parquet.items():
        with fs.open(f"{src_path}/{name}", "wb") as f:
            pq.write_table(table, f)
        for i, want in enumerate(wants, start=1):
            expected[(f"src/{name.removesuffix('.parquet')}", i)] = want

    cfg = tmp_path / "poison.yaml"
    cfg.write_text(f"""
name: poison
storage: {{root: {root}}}
stages:
  prompts: {{params: {{path: {src}, prompt_field: question, answer_field: answer}}}}
""")
    stages, st = run_stages(cfg)
    rec = stages["prompts"]
    good, bad = output_rows(st, rec, "prompts"), output_rows(st, rec, "quarantine")

    # nothing lost: every input row is either a prompt or a quarantined row, exactly once
    rows_in = len(expected)
    assert rec["metrics"]["input_rows"] == rows_in == len(good) + len(bad)
    assert rec["rows"] == {"prompts": len(good), "quarantine": len(bad)}
    assert rec["metrics"]["blank_lines"] == 1 and rows_in + 1 == len(JSONL) + sum(len(w) for _, w in parquet.values())
    assert sum(rec["metrics"]["quarantine_reasons"].values()) == len(bad)

    want_good = {(w[1], w[2]) for w in expected.values() if isinstance(w, tuple)}
    assert {(g["prompt"], g["answer"]) for g in good} == want_good and len(good) == len(want_good)
    got_bad = {(b["source"], b["row_number"]): b["reason"] for b in bad}
    assert len(got_bad) == len(bad)
    want_bad = {k: w for k, w in expected.items() if isinstance(w, str)}
    assert set(got_bad) == set(want_bad)
    for key, reason in want_bad.items():
        if reason.endswith("..."):
            assert got_bad[key].startswith(reason[:-3]), (key, got_bad[key])
        else:
            assert got_bad[key] == reason, key

    # what was kept and quarantined is stored as valid UTF-8, with the evidence visible
    meta = {g["prompt"]: json.loads(g["metadata"]) for g in good}
    assert meta["Surrogate only in metadata?"] == {"note": "\udc80"}
    assert meta["Parquet good?"] == {"level": 1}
    raw = {(b["source"], b["row_number"]): b["raw"] for b in bad}
    assert "\ufffd" in raw[("src/a", 2)] and "\\ud800" in raw[("src/a", 3)]
    assert "bad \ufffd here" in raw[("src/b", 5)]
    assert len(raw[("src/a", 26)]) <= 20000
