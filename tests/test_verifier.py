"""The verifier service never hangs and never crashes on pathological inputs, from threads too."""
import threading
import time

import pytest
from conftest import pid_running

from stages.common.checkers import FormatSpec
from stages.common.verifier import VerifierPool

FMT = FormatSpec()


def row(answer_text: str, gold: str = "7", finish: str = "stop") -> dict:
    return {"completion": answer_text, "finish_reason": finish, "answer": gold, "error": None}


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=1, timeout=3.0) as p:
        yield p


def _children_alive(p: VerifierPool) -> list[int]:
    return [w.proc.pid for w in p.workers if w.proc.is_alive()]


def test_pathological_battery(pool):
    rows = [
        row("<think>x</think> \\boxed{9^{9^{9^{9}}}}", gold="1"),  # power tower
        row("<think>" + "3 + 4 = 7\n" * 20000 + "</think> \\boxed{7}"),  # ~200 KB completion
        row("<think>a\udcff lone surrogate</think> \\boxed{7}"),
        row("<think>bad bytes \ufffd\ufffd</think> \\boxed{7\udc80}"),
        row(""),
        row("<think>reasoning</think> no boxed answer"),
        row("<think>x</think> \\boxed{7}"),
        row("<think>x</think> \\boxed{8}"),
    ]
    before, timeouts = {w.proc.pid for w in pool.workers}, pool.stats["timeouts"]
    t0 = time.monotonic()
    out = pool.check_rows(rows, FMT)
    elapsed = time.monotonic() - t0
    assert len(out) == len(rows)
    reasons = [o["reason"] for o in out]
    assert (out[0]["verdict"], reasons[0]) == ("error", "timeout")
    assert reasons[1] == "ok"
    assert reasons[2] == "ok"
    assert out[3]["verdict"] in ("rejected", "error")
    assert reasons[4] == "missing_think"
    assert reasons[5] == "no_boxed_answer"
    assert reasons[6:] == ["ok", "wrong_answer"]
    assert elapsed < 300, "hang guard only (a generous deadline, not a speed check)"
    assert pool.stats["timeouts"] == timeouts + 1  # bounded by a kill: one timeout, for the one pathological answer
    assert len(_children_alive(pool)) == 1  # a killed worker is replaced, never leaked
    replaced = before - {w.proc.pid for w in pool.workers}
    assert replaced and not any(pid_running(pid) for pid in replaced)  # the timed-out worker is gone



def test_hard_timeout_kills_and_replaces_the_worker():
    with VerifierPool(workers=1, timeout=1.0) as p:
        p.equal_many([("1", "2")])  # started: a fresh worker's imports do not count against a deadline
        before = p.workers[0].proc.pid
        t0 = time.monotonic()
        res = p.equal_many([("1", "9^{9^{9^{9^{9}}}}")])
        assert res[("1", "9^{9^{9^{9^{9}}}}")] == (False, "timeout")
        assert time.monotonic() - t0 < 300, "hang guard only (a generous deadline, not a speed check)"
        assert p.workers[0].proc.pid != before
        assert p.stats["timeouts"] == 1
        # the pool keeps working after that
        assert p.equal_many([("7", "7.0")])[("7", "7.0")] == (True, None)
        procs = [w.proc for w in p.workers]
    assert not any(proc.is_alive() for proc in procs)


def test_verdicts_are_cached(pool):
    pool.equal_many([("\\frac{1}{2}", "0.5")])
    hits = pool.stats["cache_hits"]
    assert pool.equal_many([("\\frac{1}{2}", "0.5")])[("\\frac{1}{2}", "0.5")] == (True, None)
    assert pool.stats["cache_hits"] == hits + 1


def test_works_off_the_main_thread():
    result = {}

    def run():
        with VerifierPool(workers=2, timeout=3.0) as p:
            result["out"] = p.check_rows([row("<think>x</think> \\boxed{\\frac{14}{2}}"), row("<think>x</think> \\boxed{6}")], FMT)

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert not t.is_alive()
    assert [o["reason"] for o in result["out"]] == ["ok", "wrong_answer"]


def test_a_worker_killed_under_a_check_is_a_checker_error_and_is_replaced():
    """The worker-died path: a check process killed mid-check (as the OOM killer would) gives
    that row verdict ``error`` with reason ``checker_error`` (an infrastructure fault, never a
    wrong answer), is not cached, and a fresh worker takes the next checks."""
    import os
    import signal

    slow = row("<think>x</think> \\boxed{9^{9^{9^{9}}}}", gold="1")  # busy for the whole (long) deadline
    with VerifierPool(workers=1, timeout=60.0) as p:
        assert p.equal_many([("2", "2")]) == {("2", "2"): (True, None)}  # the worker has started
        victim = p.workers[0].proc.pid

        def kill_when_busy():
            deadline = time.time() + 60
            while p.workers[0].job is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # inside the comparison
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        (v,) = p.check_rows([slow], FMT)
        killer.join()
        assert (v["verdict"], v["reason"], v["detail"]) == ("error", "checker_error", "worker died")
        assert p.stats["errors"] == 1 and p.stats["timeouts"] == 0
        assert not any("9^{9^{9^{9}}}" in str(k) for k in p.cache)  # tried again next time
        assert p.workers[0].proc.pid != victim and not pid_running(victim)
        assert p.check_rows([row("<think>x</think> \\boxed{7}")], FMT)[0]["reason"] == "ok"  # the fresh worker


def test_checker_exception_is_a_checker_error_not_a_wrong_answer():
    """A comparison that raises inside the worker comes back as the exception's text, counted as
    an error and not cached; check_rows turns such an error into verdict ``error`` with reason
    ``checker_error`` (never ``wrong_answer``)."""
    with VerifierPool(workers=1, timeout=10.0) as p:
        res = p.compare_many([((None,), ("1",))])  # a gold the checker cannot read: it raises
        (reason, err), = res.values()
        assert reason is None and err.startswith("AttributeError")
        assert p.stats["errors"] == 1 and not p.cache

        real = p.compare_many

        def failing_compare_many(jobs):  # a test double: the real checks, each answered with an error
            return {job: (None, "ValueError: injected") for job in real(jobs)}

        p.compare_many = failing_compare_many
        (v,) = p.check_rows([row("<think>x</think> \\boxed{7}")], FMT)
        assert (v["verdict"], v["reason"], v["detail"]) == ("error", "checker_error", "ValueError: injected")
