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
    before = {w.proc.pid for w in pool.workers}
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
    assert elapsed < 60  # bounded: one timeout at most per distinct answer
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
        assert time.monotonic() - t0 < 10
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
