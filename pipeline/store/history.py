"""A schedule's history under the storage root: one event per object, each created exclusively
and never rewritten (``layout.history_event``). The scheduler writes start/end/skip events; a run
whose pointer writes were fenced off (``pipeline.core.runner``) writes a ``fenced`` one."""
from __future__ import annotations

import time
from datetime import datetime, timezone

from pipeline.store import layout
from pipeline.store.lease import _holder
from pipeline.store.secrets import redact_obj
from pipeline.store.storage import Storage


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def fresh_ls(st: Storage, path: str) -> list[str]:
    """A listing that sees what other processes wrote (s3fs caches listings)."""
    try:
        st.fs.invalidate_cache(path)
    except Exception:  # pragma: no cover - filesystems without a listing cache
        pass
    return st.ls(path)


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def record(st: Storage, name: str, event: str, ident: str, body: dict, at: float | None = None) -> dict:
    """Append one history event (exclusive create: events are never rewritten)."""
    at = time.time() if at is None else at
    doc = {"event": event, "schedule": name, "at": iso(at), "by": _holder(), **redact_obj(body)}
    st.write_json(layout.history_event(st, name, f"{_stamp(at)}-{ident}", event), doc, exclusive=True)
    return doc


def read_history(st: Storage, name: str) -> list[dict]:
    """Every event, oldest first."""
    events = []
    for p in fresh_ls(st, layout.schedule_history(st, name)):
        if p.endswith(".json"):
            try:
                events.append(st.read_json(p))
            except FileNotFoundError:
                continue
    events.sort(key=lambda e: (e.get("at") or "", e.get("event") != "start"))
    return events
