"""Stable content hashes used as row ids and fingerprints."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Whitespace-collapsed, stripped text: the form ids and dedupe keys hash."""
    return _WS.sub(" ", text).strip()


def sha256_hex(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def prompt_id(prompt: str) -> str:
    """A stable id for a prompt: the hash of its normalised text (16 hex chars)."""
    return sha256_hex(normalize_text(prompt))[:16]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(obj: Any) -> str:
    return sha256_hex(canonical_json(obj))[:20]
