"""Run leases in storage: at most one run of a schedule at a time, across processes and machines.

A lease is one small JSON object at ``leases/<schedule>`` (see :mod:`pipeline.store.layout`)::

    {"name": ..., "run_id": <fencing id of the holder's run>, "holder": "host:pid",
     "slot": <epoch seconds of the cron slot it runs>, "acquired": ..., "expires": <epoch seconds>,
     "ttl": <seconds>, "released": false, "generation": <count of writes>, "epoch": <count of grants>}

**Time from the store.** Whether a lease is live is decided by the store's clock, never by the
writer's or the reader's: a lease is live while the time since its last write, as the store
measures it, is below its ``ttl``. On S3 that age is the response's ``Date`` minus the object's
``Last-Modified`` (both the server's, to the second, so a lease counts as live one second
longer); locally it is the lock file's mtime, touched at the read, minus the lease file's mtime
(both set by the filesystem). ``expires`` stays in the object, for people to read.

**Fencing epoch.** Each grant (a create or a take-over) carries ``epoch``, one more than the
lease's previous one; renewals keep it. Pointers that a run publishes are written with it and
refuse a write of an older epoch (:func:`fenced_put`).

Every write is conditional (:mod:`pipeline.store.conditional`), so two contenders can never
both believe they hold it: a free lease (no object yet) is taken by a conditional create; an
expired or released one is taken over, a live one renewed and released, by a compare-and-swap
on the version read before. Locally every write holds a fresh nonce, so no two versions share
an ETag; readers take a shared lock, so they never see a lease mid-swap.

A holder that lost its lease (it expired and someone took it over) fails its next renewal
with :class:`LeaseLost`: its ETag no longer matches. The lease is never deleted, so the
``slot`` it last ran survives and a slot is run at most once: taking the lease for a slot
at or before the recorded one fails with :class:`SlotTaken`.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from pipeline.store import layout
from pipeline.store.conditional import ConditionalWriteError, ConditionFailed, conditional_store, swap
from pipeline.store.storage import Storage

DEFAULT_TTL = 300.0
_TRANSIENT = ("store_age", "store_resolution", "read_at")  # attached by read_lease, never written


def _now() -> float:
    """This machine's wall clock; only for the informational ``acquired``/``expires``."""
    return time.time()


class LeaseError(ConditionalWriteError):
    pass


class LeaseHeld(LeaseError):
    """A live lease belongs to someone else."""

    def __init__(self, state: dict):
        self.state = state
        left = remaining(state)
        super().__init__(f"lease {state.get('name')!r} is held by run {state.get('run_id')} "
                         f"({state.get('holder')}) for {left:.0f}s more")


class SlotTaken(LeaseError):
    """The slot asked for was already run (or a later one was)."""

    def __init__(self, state: dict, slot: float):
        self.state = state
        super().__init__(f"lease {state.get('name')!r}: slot {slot:.0f} already taken by run {state.get('run_id')} "
                         f"(slot {state.get('slot')})")


class LeaseLost(LeaseError):
    """The lease changed since this holder last wrote it: it was taken over."""


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# -- the lease ------------------------------------------------------------------------------------

@dataclass
class Lease:
    """A lease this process holds; ``renew`` and ``release`` are conditional on ``etag``."""

    storage: Storage
    name: str
    state: dict
    etag: str
    ttl: float

    @property
    def path(self) -> str:
        return layout.lease(self.storage, self.name)

    @property
    def run_id(self) -> str:
        return self.state["run_id"]

    @property
    def epoch(self) -> int:
        return int(self.state.get("epoch") or 0)

    def _write(self, state: dict) -> None:
        state = {**state, "generation": self.state.get("generation", 0) + 1, "nonce": uuid.uuid4().hex}
        try:
            self.etag = conditional_store(self.storage).replace(self.path, _encode(state), self.etag)
        except ConditionFailed as e:
            current = read_lease(self.storage, self.name)
            who = f"run {current[0].get('run_id')}" if current else "nobody (it is gone)"
            raise LeaseLost(f"lease {self.name!r} of run {self.run_id} was lost: now held by {who}") from e
        self.state = state

    def renew(self, ttl: float | None = None) -> None:
        """Extend the expiry; raises :class:`LeaseLost` if someone took the lease over."""
        self.ttl = ttl or self.ttl
        now = _now()
        self._write({**self.state, "expires": now + self.ttl, "ttl": self.ttl, "renewed": now})

    def release(self, **extra) -> None:
        """Mark the lease free (it stays, holding the slot it ran). ``extra`` is recorded in it."""
        self._write({**self.state, **extra, "released": True, "expires": _now()})


def _encode(state: dict) -> bytes:
    return json.dumps({k: v for k, v in state.items() if k not in _TRANSIENT}, sort_keys=True).encode()


def read_lease(storage: Storage, name: str) -> tuple[dict, str] | None:
    """The lease's state and ETag, or None when there is none. The state carries ``store_age``
    (seconds since its last write, by the store's clock) for :func:`is_live`."""
    got = conditional_store(storage).read_aged(layout.lease(storage, name))
    if got is None:
        return None
    data, etag, age, resolution = got
    return {**json.loads(data.decode()), "store_age": age, "store_resolution": resolution,
            "read_at": time.monotonic()}, etag


def _elapsed(state: dict) -> float | None:
    if "store_age" not in state or not state.get("ttl"):
        return None
    return state["store_age"] + max(0.0, time.monotonic() - state.get("read_at", time.monotonic()))


def remaining(state: dict) -> float:
    """Seconds the lease has left, by the store's clock (0 when released or expired)."""
    if state.get("released"):
        return 0.0
    elapsed = _elapsed(state)
    if elapsed is None:  # written before leases kept their ttl: the writer's expiry
        return max(0.0, state.get("expires", 0) - _now())
    return max(0.0, float(state["ttl"]) + state.get("store_resolution", 0.0) - elapsed)


def is_live(state: dict, now: float | None = None) -> bool:
    """Whether the lease is held: not released and younger than its ttl by the store's clock
    (``now`` only matters for a lease read without its age)."""
    if state.get("released"):
        return False
    if _elapsed(state) is None:
        return state.get("expires", 0) > (_now() if now is None else now)
    return remaining(state) > 0


def acquire(storage: Storage, name: str, run_id: str, ttl: float = DEFAULT_TTL, slot: float | None = None,
            **extra) -> Lease:
    """Take the lease of ``name`` for run ``run_id`` (the fencing id): create it when there is
    none, take it over when it expired or was released. Raises :class:`LeaseHeld` while another
    holder's lease is live, :class:`SlotTaken` when ``slot`` is not after the slot the lease
    last ran. Exactly one of several concurrent contenders succeeds."""
    backend = conditional_store(storage)
    path = layout.lease(storage, name)
    now = _now()
    state = {"name": name, "run_id": run_id, "holder": _holder(), "slot": now if slot is None else slot,
             "acquired": now, "expires": now + ttl, "ttl": ttl, "released": False, **extra}
    current = read_lease(storage, name)
    if current is None:
        state.update(generation=1, epoch=1, nonce=uuid.uuid4().hex)
        try:
            return Lease(storage, name, state, backend.create(path, _encode(state)), ttl)
        except ConditionFailed:
            current = read_lease(storage, name)  # someone created it first
            if current is None:
                raise LeaseError(f"lease {name!r}: create conflicted but nothing is there")
    old, etag = current
    if is_live(old):
        raise LeaseHeld(old)
    if slot is not None and old.get("slot") is not None and slot <= old["slot"]:
        raise SlotTaken(old, slot)
    state.update(generation=old.get("generation", 0) + 1, nonce=uuid.uuid4().hex, previous_run_id=old.get("run_id"),
                 previous_released=bool(old.get("released")),
                 epoch=int(old.get("epoch") or old.get("generation") or 0) + 1)
    try:
        return Lease(storage, name, state, backend.replace(path, _encode(state), etag), ttl)
    except ConditionFailed:
        latest = read_lease(storage, name)
        if latest is not None and is_live(latest[0]):
            raise LeaseHeld(latest[0]) from None
        raise LeaseHeld(latest[0] if latest else old) from None


# -- fencing: pointers that refuse an older epoch -------------------------------------------------

FENCE_ENV = "DISTILL_FENCE"


def current_fence(env: dict | None = None) -> dict | None:
    """The fence a scheduled run was started with (``DISTILL_FENCE``: lease, epoch, run id), or
    None for a run that no lease covers."""
    raw = (os.environ if env is None else env).get(FENCE_ENV)
    if not raw:
        return None
    try:
        fence = json.loads(raw)
        return {"lease": str(fence["lease"]), "epoch": int(fence["epoch"]), "run_id": str(fence.get("run_id")),
                "root": fence.get("root")}
    except (ValueError, KeyError, TypeError) as e:
        raise LeaseError(f"{FENCE_ENV}: not a fence ({e}); expected JSON with lease and epoch") from None


def fenced_put(storage: Storage, path: str, data: bytes, fence: dict,
               fence_of: Callable[[bytes], dict | None], tries: int = 20) -> dict | None:
    """Write ``data`` at ``path`` unless what is there carries a newer epoch of the same lease
    (``fence_of`` reads the fence of the current bytes). A compare-and-swap, so a newer run's
    write that lands in between is seen. Returns None when written, else the newer fence that
    refused it."""
    refused: dict | None = None

    def update(current: bytes | None) -> bytes | None:
        nonlocal refused
        refused = newer_fence(current, fence, fence_of)
        return None if refused else data

    swap(storage, path, update, tries)
    return refused


def newer_fence(current: bytes | None, fence: dict | None, fence_of: Callable[[bytes], dict | None]) -> dict | None:
    """The fence of ``current`` if it is a newer epoch of ``fence``'s lease, else None."""
    if current is None or not fence:
        return None
    try:
        theirs = fence_of(current)
    except Exception:  # unreadable or unfenced: not newer
        return None
    if theirs and theirs.get("lease") == fence["lease"] and int(theirs.get("epoch") or 0) > fence["epoch"]:
        return theirs
    return None
