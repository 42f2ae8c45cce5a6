"""The secrets of this environment, and the one redactor every output of distill goes through.

:func:`secret_values` finds what must never be shown, sent or stored:

- variables whose *name* says secret (``SECRET``, ``TOKEN``, ``PASSW``/``PWD``, ``*_KEY``,
  ``KEY_*``, ``API_KEY``, ``CREDENTIAL``, ``AUTH``, ``DSN``, ``DATABASE_URL``, ...), so
  ``OPENAI_KEY`` and ``DATABASE_URL`` count as well as ``AWS_SECRET_ACCESS_KEY``;
- the password of any URL held by any variable (``http://user:pw@host``);
- the keys of the AWS credential and config files (``aws_access_key_id``,
  ``aws_secret_access_key``, ``aws_session_token``), the Hugging Face and Ray token files,
  and passwords of ``~/.netrc``.

:func:`redact` replaces, in any text: each of those values, and its URL-encoded and base64
forms (base64 at each of the three byte alignments, so a copy inside a longer encoded blob,
such as a Basic auth header, is found too); the password of every URL (``scheme://user:***@``);
AWS access key ids by their shape (``AKIA…``, ``ASIA…``); PEM private key blocks.

:func:`install_redacting_streams` puts the redactor in front of ``sys.stdout``/``sys.stderr``
of a CLI process, so every line it prints (tables, ``--json``, errors, job messages, logs)
passes through it.
"""
from __future__ import annotations

import base64
import configparser
import io
import os
import re
import sys
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote, urlsplit

_SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSW|PASSPHRASE|PWD|(^|_)KEY($|_)|KEYS?$|APIKEY|API_KEY|ACCESS_KEY|PRIVATE|CREDENTIAL|CREDS"
    r"|SESSION_KEY|AUTH|COOKIE|SIGNATURE|DSN$|DATABASE_URL|CONN(ECTION)?_?STR", re.I)
# names that hold a path, a switch or a public id, not a secret (RAY_AUTH_TOKEN_PATH names a file)
_NOT_A_VALUE = re.compile(r"_(PATH|FILE|DIR|MODE|ENABLED|DISABLED|TYPE|REGION|URL_PREFIX)$|^(PWD|OLDPWD)$", re.I)
_NOT_SECRET_WORDS = {"true", "false", "enabled", "disabled", "none", "null", "token"}
MIN_LEN = 8  # shorter values are not redacted (they would match all over ordinary text)

_URL_PASSWORD = re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@'\"]*:)(?P<pw>[^/\s@'\"]+)(?=@)")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA|ABIA|ACCA)[A-Z0-9]{16}\b")
_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S)
_AWS_FILE_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_security_token")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _url_password(value: str) -> str | None:
    if "://" not in value or "@" not in value:
        return None
    try:
        pw = urlsplit(value.strip()).password
    except ValueError:
        return None
    return unquote(pw) if pw else None


def _aws_files(env: dict, home: Path) -> dict[str, str]:
    found = {}
    files = [Path(env["AWS_SHARED_CREDENTIALS_FILE"]) if env.get("AWS_SHARED_CREDENTIALS_FILE") else
             home / ".aws" / "credentials",
             Path(env["AWS_CONFIG_FILE"]) if env.get("AWS_CONFIG_FILE") else home / ".aws" / "config"]
    for path in files:
        text = _read(path)
        if not text:
            continue
        parser = configparser.RawConfigParser(strict=False)
        try:
            parser.read_string(text)
        except configparser.Error:
            continue
        for section in parser.sections():
            for key in _AWS_FILE_KEYS:
                value = (parser.get(section, key, fallback="") or "").strip()
                if value:
                    found[f"{path.name}[{section}].{key}"] = value
    return found


def _netrc(home: Path) -> dict[str, str]:
    text = _read(home / ".netrc") or ""
    words = text.split()
    return {f".netrc password {i}": words[i + 1] for i, w in enumerate(words[:-1]) if w == "password"}


def secret_values(env: dict | None = None) -> dict[str, str]:
    """Where each secret of this environment comes from -> its value (see the module docstring)."""
    env = dict(os.environ if env is None else env)
    found: dict[str, str] = {}
    for k, v in env.items():
        v = (v or "").strip()
        if _SECRET_NAME.search(k) and not _NOT_A_VALUE.search(k) and v.lower() not in _NOT_SECRET_WORDS:
            found[k] = v
        pw = _url_password(v)
        if pw:
            found[f"{k} (URL password)"] = pw
    home = Path(env.get("HOME") or Path.home())
    files = {
        "RAY_AUTH_TOKEN_PATH": Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else None,
        "~/.ray/auth_token": home / ".ray" / "auth_token",
        "HF_TOKEN_PATH": Path(env["HF_TOKEN_PATH"]) if env.get("HF_TOKEN_PATH") else None,
        "HF_HOME/token": Path(env["HF_HOME"]) / "token" if env.get("HF_HOME") else None,
        "~/.cache/huggingface/token": home / ".cache" / "huggingface" / "token",
        "~/.huggingface/token": home / ".huggingface" / "token",
    }
    for name, path in files.items():
        value = _read(path) if path else None
        if value:
            found[name] = value
    found.update(_aws_files(env, home))
    found.update(_netrc(home))
    return {k: v for k, v in found.items() if len(v) >= MIN_LEN}


def _b64_cores(value: bytes) -> set[str]:
    """The parts of a base64 text that are the same wherever ``value`` sits in the encoded
    bytes: one per alignment (0, 1 or 2 bytes before it in its 3-byte group)."""
    cores = set()
    for k in range(3):
        for enc in (base64.b64encode(b"\0" * k + value).decode(), base64.urlsafe_b64encode(b"\0" * k + value).decode()):
            start = -(-k * 8 // 6)  # characters touched by the k leading bytes
            end = ((k + len(value)) * 8) // 6  # characters made only of the value's bits
            core = enc[start:end]
            if len(core) >= MIN_LEN:
                cores.add(core)
    return cores


def forms(value: str) -> set[str]:
    """``value`` and the encoded forms of it that :func:`redact` also removes."""
    out = {value, quote(value, safe=""), quote_plus(value), quote(value)}
    out |= _b64_cores(value.encode())
    return {f for f in out if len(f) >= MIN_LEN}


def redact(text: str, secrets: dict[str, str] | None = None) -> str:
    """``text`` with every secret of this environment (and its encoded forms), every URL
    password, AWS access key id and PEM private key replaced by ``***``."""
    if not text:
        return text
    values = secrets if secrets is not None else secret_values()
    every = set()
    for v in values.values():
        every |= forms(v)
    for f in sorted(every, key=len, reverse=True):
        text = text.replace(f, "***")
    text = _URL_PASSWORD.sub(lambda m: m.group("pre") + "***", text)
    text = _AWS_KEY_ID.sub("***", text)
    return _PEM_PRIVATE.sub("-----PRIVATE KEY (redacted)-----", text)


def redact_obj(obj):
    """A JSON-like object with every string in it redacted (for records written to storage)."""
    secrets = secret_values()

    def walk(o):
        if isinstance(o, str):
            return redact(o, secrets)
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return o

    return walk(obj)


class RedactingStream(io.TextIOBase):
    """A text stream that redacts what is written before passing it on. Output is held back
    until a newline (or a flush), so a secret split over two writes is still found."""

    def __init__(self, inner, secrets: dict[str, str]):
        self.inner, self.secrets, self._buf = inner, secrets, ""

    def write(self, s: str) -> int:
        self._buf += s
        if "\n" in self._buf:
            head, self._buf = self._buf.rsplit("\n", 1)
            self.inner.write(redact(head + "\n", self.secrets))
        return len(s)

    def flush(self) -> None:
        try:
            if self._buf:
                self.inner.write(redact(self._buf, self.secrets))
                self._buf = ""
            self.inner.flush()
        except (ValueError, OSError):  # the stream underneath was closed (a test runner's capture)
            self._buf = ""

    def isatty(self) -> bool:
        try:
            return self.inner.isatty()
        except (ValueError, OSError):
            return False

    @property
    def closed(self) -> bool:
        return getattr(self.inner, "closed", False)

    def fileno(self) -> int:
        return self.inner.fileno()

    @property
    def encoding(self):
        return getattr(self.inner, "encoding", "utf-8")


_flush_at_exit: list[bool] = []


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, RedactingStream):
            stream.flush()


def install_redacting_streams() -> None:
    """Route ``sys.stdout`` and ``sys.stderr`` through :func:`redact` (once per stream)."""
    import atexit

    secrets = secret_values()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, RedactingStream) or stream is None:
            continue
        setattr(sys, name, RedactingStream(stream, secrets))
    if not _flush_at_exit:
        _flush_at_exit.append(True)
        atexit.register(_flush_streams)
