"""Run leases: conditional create and conditional overwrite, locally and on (moto) S3, raced by
separate processes; liveness by the store's clock (a skewed writer or reader changes nothing);
a fencing epoch per grant. No wall-clock assertion: where a lease must expire, the test waits
for the take-over to succeed, under a generous hang guard that says it is one."""
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

from pipeline.store import layout
from pipeline.store.lease import LeaseHeld, LeaseLost, SlotTaken, acquire, is_live, read_lease
from pipeline.store.storage import Storage

# Each contender says it is ready, waits for "go" on stdin, then tries to take the lease once.
RACER = """
import json, sys
from pipeline.store.lease import LeaseError, acquire
from pipeline.store.storage import Storage
root, name, run_id, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
st = Storage(root)
st.exists(st.root)  # the S3 client is set up before the start
print("ready", flush=True)
sys.stdin.readline()
try:
    lease = acquire(st, name, run_id, ttl=ttl)
    print(json.dumps({"run_id": run_id, "won": True, "etag": lease.etag}))
except LeaseError as e:
    print(json.dumps({"run_id": run_id, "won": False, "error": type(e).__name__}))
"""

CONTENDERS = 4
HANG_GUARD_S = 60  # a hang guard, not a timing assertion: expiry takes ~ttl (+1 s on S3)


def _take_when_expired(st, name, run_id, ttl=30.0, **kw):
    """Acquire as soon as the lease has expired (LeaseHeld until then)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        try:
            return acquire(st, name, run_id, ttl=ttl, **kw)
        except LeaseHeld:
            assert time.monotonic() < deadline, f"hang guard: the lease never expired in {HANG_GUARD_S}s"
            time.sleep(0.2)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("moto_s3_bucket")
    return f"s3://distill-test/lease-{tmp_path.name}"


def _race(root: str, name: str, ttl: float = 60.0) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", RACER, root, name, f"run-{i}", str(ttl)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for i in range(CONTENDERS)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # all at once
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_race_for_a_free_lease_has_one_winner(root):
    results = _race(root, "nightly")
    winners = [r for r in results if r["won"]]
    assert len(winners) == 1, results
    assert {r["error"] for r in results if not r["won"]} == {"LeaseHeld"}
    state, etag = read_lease(Storage(root), "nightly")
    assert state["run_id"] == winners[0]["run_id"] and etag == winners[0]["etag"]


def test_expired_lease_is_taken_over_by_exactly_one(root):
    st = Storage(root)
    old = acquire(st, "nightly", "run-old", ttl=0.5)
    deadline = time.monotonic() + HANG_GUARD_S
    while is_live(read_lease(st, "nightly")[0]):
        assert time.monotonic() < deadline, f"hang guard: the lease never expired in {HANG_GUARD_S}s"
        time.sleep(0.2)
    results = _race(root, "nightly")
    winners = [r for r in results if r["won"]]
    assert len(winners) == 1, results
    state, _ = read_lease(st, "nightly")
    assert state["run_id"] == winners[0]["run_id"] and state["previous_run_id"] == "run-old"
    with pytest.raises(LeaseLost, match=winners[0]["run_id"]):
        old.renew()


def test_holder_that_lost_its_lease_cannot_renew_or_release(root):
    st = Storage(root)
    a = acquire(st, "s", "run-a", ttl=30)
    a.renew()  # a live holder renews
    with pytest.raises(LeaseHeld, match="run-a"):
        acquire(st, "s", "run-b", ttl=30)
    a.renew(ttl=0.5)  # from now on it lives half a second: it stops renewing
    b = _take_when_expired(st, "s", "run-b")
    assert b.epoch == a.epoch + 1
    with pytest.raises(LeaseLost):
        a.renew()
    with pytest.raises(LeaseLost):
        a.release()
    assert read_lease(st, "s")[0]["run_id"] == "run-b"
    b.renew()
    b.release(status="done")
    state, _ = read_lease(st, "s")
    assert state["released"] and state["status"] == "done" and state["run_id"] == "run-b"
    # a released lease is free at once
    acquire(st, "s", "run-c", ttl=30).release()


def test_a_slot_runs_once(root):
    st = Storage(root)
    acquire(st, "s", "run-1", ttl=30, slot=100.0).release()
    with pytest.raises(SlotTaken):
        acquire(st, "s", "run-2", ttl=30, slot=100.0)
    with pytest.raises(SlotTaken):
        acquire(st, "s", "run-2", ttl=30, slot=50.0)
    assert acquire(st, "s", "run-3", ttl=30, slot=101.0).state["slot"] == 101.0


def test_local_overwrite_compares_the_etag(tmp_path):
    """The local compare-and-swap refuses a write based on a version that is no longer there,
    even when the lease looks free to the writer."""
    from pipeline.store.conditional import ConditionFailed, _LocalBackend

    st = Storage(str(tmp_path / "root"))
    acquire(st, "s", "run-1", ttl=30).release()
    _, etag = read_lease(st, "s")
    backend = _LocalBackend()
    path = layout.lease(st, "s")
    backend.replace(path, b'{"run_id": "x"}', etag)
    with pytest.raises(ConditionFailed):
        backend.replace(path, b'{"run_id": "y"}', etag)  # stale etag
    with pytest.raises(ConditionFailed):
        backend.create(path, b"{}")
    assert json.loads(open(path, "rb").read())["run_id"] == "x"


@pytest.mark.parametrize("skew", [60.0, -60.0])
def test_a_skewed_clock_cannot_take_a_live_lease(root, monkeypatch, skew):
    """Liveness is the store's age of the lease against its ttl, never a wall clock: a holder
    whose clock runs 60 s ahead or behind neither takes a live lease nor writes one that others
    see as expired."""
    import pipeline.store.lease as lease_mod

    st = Storage(root)
    real = lease_mod._now
    acquire(st, "s", "run-a", ttl=30)
    monkeypatch.setattr(lease_mod, "_now", lambda: real() + skew)  # this process's clock is off by `skew`
    with pytest.raises(LeaseHeld, match="run-a"):
        acquire(st, "s", "run-b", ttl=30)
    b_state = read_lease(st, "s")[0]
    assert b_state["run_id"] == "run-a" and lease_mod.remaining(b_state) > 20
    # the skewed process takes another lease; a process with the right clock sees it live
    acquire(st, "t", "run-skewed", ttl=30)
    monkeypatch.setattr(lease_mod, "_now", real)
    with pytest.raises(LeaseHeld, match="run-skewed"):
        acquire(st, "t", "run-c", ttl=30)


def test_each_grant_has_a_higher_epoch(root):
    st = Storage(root)
    a = acquire(st, "e", "run-1", ttl=30)
    a.renew()
    assert a.epoch == 1 and read_lease(st, "e")[0]["epoch"] == 1  # a renewal keeps the epoch
    a.release()
    b = acquire(st, "e", "run-2", ttl=30)
    assert b.epoch == 2 and read_lease(st, "e")[0]["epoch"] == 2
