"""The secrets of this environment, so that they can be kept out of everything distill writes,
sends or prints: cloud keys and tokens in variables whose names say so, and the Ray and Hugging
Face token files."""
from __future__ import annotations

import os
import re
from pathlib import Path

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL|SESSION_KEY", re.I)
_NOT_A_VALUE = re.compile(r"_(PATH|FILE|DIR|MODE)$", re.I)  # RAY_AUTH_TOKEN_PATH names a file, not a secret


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def secret_values(env: dict | None = None) -> dict[str, str]:
    """Where each secret of this environment comes from -> its value: variables whose name
    says secret/token/key/password, and the Ray and Hugging Face token files."""
    env = dict(os.environ if env is None else env)
    found = {k: v.strip() for k, v in env.items()
             if _SECRET_NAME.search(k) and not _NOT_A_VALUE.search(k) and len(v.strip()) >= 8}
    home = Path(env.get("HOME") or Path.home())
    files = {
        "RAY_AUTH_TOKEN_PATH": Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else None,
        "~/.ray/auth_token": home / ".ray" / "auth_token",
        "HF_TOKEN_PATH": Path(env["HF_TOKEN_PATH"]) if env.get("HF_TOKEN_PATH") else None,
        "~/.cache/huggingface/token": home / ".cache" / "huggingface" / "token",
    }
    for name, path in files.items():
        value = _read(path) if path else None
        if value and len(value) >= 8:
            found[name] = value
    return found


def redact(text: str, secrets: dict[str, str] | None = None) -> str:
    """``text`` with every secret value of this environment replaced by ``***``."""
    for value in sorted((secrets if secrets is not None else secret_values()).values(), key=len, reverse=True):
        text = text.replace(value, "***")
    return text
