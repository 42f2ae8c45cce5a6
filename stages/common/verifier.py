"""A verifier service: math equality checks in worker processes with a hard wall-clock timeout.

math-verify's own timeouts use ``signal.alarm``, which only works on a process's
main thread, so inside Ray actors or threads a pathological answer (say
``9^{9^{9^{9}}}``) could hang a stage. Here every equality check runs in a worker
process; one that overruns its deadline is killed (SIGKILL) and replaced, and the
check gets verdict ``error`` / reason ``timeout``. The cheap parts (format checks,
``\\boxed{}`` extraction) stay in the calling process; only the sympy work is sent
out. Results are cached by (checker version, gold answer, extracted answer).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection, wait
from typing import Iterable

from .checkers import CHECKER_VERSION, FormatSpec, Verdict, check_sample, gold_answer


def _worker(conn: Connection) -> None:  # pragma: no cover - runs in a child process
    import logging

    from . import checkers

    checkers.SIGNAL_TIMEOUTS = False  # the parent's deadline is the only limit
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning: we enforce one
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        key, gold, pred = job
        try:
            conn.send((key, bool(checkers.answers_equal(gold, pred)), None))
        except Exception as e:  # a checker fault is an answer too
            conn.send((key, False, f"{type(e).__name__}: {str(e)[:300]}"))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.job: tuple | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        try:
            self.proc.kill()
        finally:
            self.proc.join(5)
            self.conn.close()


class VerifierPool:
    """``workers`` processes checking ``(gold, extracted)`` equality with a per-check deadline."""

    def __init__(self, workers: int = 1, timeout: float = 5.0):
        self.ctx = mp.get_context("spawn")
        self.timeout = timeout
        self.workers = [_Worker(self.ctx) for _ in range(max(1, workers))]
        self.cache: dict[tuple, tuple[bool, str | None]] = {}
        self.stats = {"checks": 0, "cache_hits": 0, "timeouts": 0, "errors": 0}

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            w.proc.join(2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(2)
        self.workers = []

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def equal_many(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[bool, str | None]]:
        """``{(gold, pred): (equal, error)}``; ``error`` is ``"timeout"`` or the checker's exception."""
        results: dict[tuple[str, str], tuple[bool, str | None]] = {}
        todo = []
        for gold, pred in dict.fromkeys(pairs):
            key = (CHECKER_VERSION, gold, pred)
            if key in self.cache:
                self.stats["cache_hits"] += 1
                results[(gold, pred)] = self.cache[key]
            else:
                todo.append((gold, pred))
        todo.reverse()
        busy: dict[Connection, _Worker] = {}
        while todo or busy:
            for w in self.workers:
                if w.job is None and todo:
                    gold, pred = todo.pop()
                    w.job, w.deadline = (gold, pred), time.monotonic() + self.timeout
                    w.conn.send(((gold, pred), gold, pred))
                    busy[w.conn] = w
            now = time.monotonic()
            next_deadline = min(w.deadline for w in busy.values())
            ready = wait(list(busy), timeout=max(0.0, next_deadline - now))
            for conn in ready:
                w = busy.pop(conn)
                try:
                    key, ok, err = conn.recv()
                except (EOFError, OSError):  # the worker died under the check (e.g. out of memory)
                    key, ok, err = w.job, False, "worker died"
                    self._replace(w)
                self._record(w.job, ok, err, results)
                w.job = None
            now = time.monotonic()
            for conn, w in list(busy.items()):
                if w.job is not None and now >= w.deadline:
                    busy.pop(conn)
                    job = w.job
                    self._replace(w)
                    self.stats["timeouts"] += 1
                    self._record(job, False, "timeout", results)
        return results

    def _record(self, job, ok, err, results) -> None:
        self.stats["checks"] += 1
        if err and err != "timeout":
            self.stats["errors"] += 1
        self.cache[(CHECKER_VERSION, *job)] = (ok, err)
        results[job] = (ok, err)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        fresh = _Worker(self.ctx)
        w.conn, w.proc, w.job = fresh.conn, fresh.proc, None

    def check_rows(self, rows: list[dict], fmt: FormatSpec) -> list[dict]:
        """Verdict columns (verdict, reason, detail, extracted) for sample rows."""
        pending: list[tuple[int, str, str]] = []
        verdicts: list[Verdict | None] = []
        for i, r in enumerate(rows):
            # format and extraction only: the math comparison is deferred to the workers
            v = check_sample(r.get("completion"), r.get("finish_reason"), r.get("answer"), fmt, r.get("error"),
                             compare=False)
            if v.reason == "compare":
                pending.append((i, gold_answer(r["answer"]), v.extracted))
            verdicts.append(v)
        eq = self.equal_many((g, p) for _, g, p in pending)
        for i, g, p in pending:
            ok, err = eq[(g, p)]
            if err == "timeout":
                verdicts[i] = Verdict("error", "timeout", f"answer check exceeded {self.timeout:g}s", p)
            elif err:
                verdicts[i] = Verdict("error", "checker_error", err, p)
            elif ok:
                verdicts[i] = Verdict("correct", "ok", "", p)
            else:
                verdicts[i] = Verdict("rejected", "wrong_answer", f"expected {g[:200]}, got {p[:200]}", p)
        return [{"verdict": v.verdict, "reason": v.reason, "detail": v.detail, "extracted": v.extracted} for v in verdicts]


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))
