"""``distill doctor ROOT``: prove that a storage root honours what leases and pointers rely on.

Leases, commits and fenced pointers (:mod:`pipeline.store.conditional`) are safe only if the store refuses a
conditional create of a key that exists (``If-None-Match: *``; locally ``link()``) and a
compare-and-swap against a version that is no longer there (``If-Match: <ETag>``; locally the
``flock``-guarded digest check). Some S3-compatible stores accept those headers and ignore
them. The doctor tries each on a scratch key under ``_doctor/`` and removes it afterwards.
A scheduler runs it once when it starts and refuses to run schedules on a store that fails.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from pipeline.store.conditional import ConditionalWriteError, ConditionFailed, conditional_store
from pipeline.store.storage import Storage


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class StoreUnsafe(RuntimeError):
    """The store does not honour conditional writes; the message names which."""


def check_store(st: Storage) -> list[Check]:
    """Each check's outcome, on a scratch key of ``st``."""
    try:
        backend = conditional_store(st)
    except ConditionalWriteError as e:
        return [Check("conditional writes", False, str(e))]
    path = st.path("_doctor", uuid.uuid4().hex)
    checks: list[Check] = []
    try:
        try:
            etag1 = backend.create(path, b"doctor-1")
            checks.append(Check("conditional create of a new key", True, "written"))
        except Exception as e:
            return [Check("conditional create of a new key", False, f"{type(e).__name__}: {e}")]
        try:
            backend.create(path, b"doctor-2")
            checks.append(Check("conditional create of an existing key is refused (If-None-Match)", False,
                                "the store overwrote an existing key: it ignores If-None-Match"))
            etag1 = backend.read(path)[1]
        except ConditionFailed:
            checks.append(Check("conditional create of an existing key is refused (If-None-Match)", True, "refused"))
        try:
            etag2 = backend.replace(path, b"doctor-3", etag1)
            checks.append(Check("compare-and-swap with the current version", True, "written"))
        except Exception as e:
            checks.append(Check("compare-and-swap with the current version", False, f"{type(e).__name__}: {e}"))
            return checks
        try:
            backend.replace(path, b"doctor-4", etag1)
            checks.append(Check("compare-and-swap with a stale version is refused (If-Match)", False,
                                "the store replaced a key whose version had changed: it ignores If-Match"))
        except ConditionFailed:
            checks.append(Check("compare-and-swap with a stale version is refused (If-Match)", True, "refused"))
        got = backend.read(path)
        expected = b"doctor-3" if checks[-1].ok else b"doctor-4"
        ok = got is not None and got[0] == expected and (not checks[-1].ok or got[1] == etag2)
        checks.append(Check("read back the last write with its version", ok,
                            "as written" if ok else f"read {got[0][:20] if got else None!r}"))
    finally:
        try:
            st.fs.rm(path)
            st.fs.rm(f"{path}.lock") if st.is_local else None
        except (FileNotFoundError, OSError):
            pass
    return checks


def require_safe_store(st: Storage) -> list[Check]:
    """:func:`check_store`, raising :class:`StoreUnsafe` when a check fails."""
    checks = check_store(st)
    bad = [c for c in checks if not c.ok]
    if bad:
        raise StoreUnsafe(f"{st.root_uri}: the store does not honour conditional writes, so leases and fenced "
                          "pointers are not safe on it: " + "; ".join(f"{c.name}: {c.detail}" for c in bad))
    return checks


def doctor_cmd(root: str, json_: bool = False) -> int:
    """Print each check; the exit code is 0 only when all pass."""
    import json
    import sys

    from pipeline.store.secrets import redact

    checks = check_store(Storage(root))
    if json_:
        sys.stdout.write(json.dumps({"root": redact(root), "ok": all(c.ok for c in checks),
                                     "checks": [c.__dict__ for c in checks]}, indent=2) + "\n")
    else:
        for c in checks:
            sys.stdout.write(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}\n")
        sys.stdout.write(f"{redact(root)}: {'safe for leases and fenced pointers' if all(c.ok for c in checks) else 'NOT safe'}\n")
    return 0 if all(c.ok for c in checks) else 1


def register(app) -> None:
    import typer

    @app.command("doctor")
    def doctor(root: str = typer.Argument(..., help="storage root to check (local or s3://)"),
               json_: bool = typer.Option(False, "--json", help="machine-readable output")):
        """Check that a storage root honours conditional create and compare-and-swap (leases need both)."""
        raise typer.Exit(doctor_cmd(root, json_))
