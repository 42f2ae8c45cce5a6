"""A verifier service: math equality checks in worker processes with a hard wall-clock timeout.

math-verify's own timeouts use ``signal.alarm``, which only works on a process's
main thread, so inside Ray actors or threads a pathological answer (say
``9^{9^{9^{9}}}``) could hang a stage. Here every equality check runs in a worker
process; one that overruns its deadline is killed (SIGKILL) and replaced, and the
check gets verdict ``error`` / reason ``timeout``. A check is a whole answer: every
part of a multi-part gold answer and every boxed value of the sample (``checkers.
compare_answers``), so several boxes cannot stretch one check past the deadline. The
cheap parts (format checks, ``\\boxed{}`` extraction) stay in the calling process;
only the sympy work is sent out. Results are cached by (checker version, gold parts,
answer parts).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection, wait
from typing import Iterable

from .checkers import CHECKER_VERSION, FormatSpec, check_code_rows, check_sample, is_code_row, math_verdict


def _worker(conn: Connection) -> None:  # pragma: no cover - runs in a child process
    import logging

    from . import checkers

    checkers.SIGNAL_TIMEOUTS = False  # the parent's deadline is the only limit
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning: we enforce one
    checkers.compare_answers(("1",), ("2",), None)  # imports (sympy, the LaTeX parser) before the first deadline
    conn.send(READY)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        key, gold, pred = job
        try:
            conn.send((key, checkers.compare_answers(gold, pred, None), None))
        except Exception as e:  # a checker fault is an answer too
            conn.send((key, None, f"{type(e).__name__}: {str(e)[:300]}"))


READY = "ready"
STARTUP_TIMEOUT_S = 120.0  # a fresh worker's imports, not counted against a check's deadline


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.job: tuple | None = None
        self.deadline = 0.0
        self.ready = False

    def kill(self) -> None:
        try:
            self.proc.kill()
        finally:
            self.proc.join(5)
            self.conn.close()


class VerifierPool:
    """``workers`` processes comparing answers with gold answers, with a per-check deadline."""

    def __init__(self, workers: int = 1, timeout: float = 5.0):
        self.ctx = mp.get_context("spawn")
        self.timeout = timeout
        self.workers = [_Worker(self.ctx) for _ in range(max(1, workers))]
        self.cache: dict[tuple, tuple[str | None, str | None]] = {}
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
        """``{(gold, pred): (equal, error)}`` for single answers (strings as written inside
        ``\\boxed{}``); ``error`` is ``"timeout"`` or the checker's exception."""
        pairs = list(dict.fromkeys(pairs))
        res = self.compare_many(((g,), (p,)) for g, p in pairs)
        return {(g, p): (res[((g,), (p,))][0] == "ok", res[((g,), (p,))][1]) for g, p in pairs}

    def compare_many(self, jobs: Iterable[tuple[tuple[str, ...], tuple[str, ...]]]
                     ) -> dict[tuple, tuple[str | None, str | None]]:
        """``{(gold parts, answer parts): (reason, error)}``: reason ``ok``, ``wrong_answer`` or
        ``hedged_answer`` (``checkers.compare_answers``), or None with ``error`` ``"timeout"``
        or the checker's exception."""
        results: dict[tuple, tuple[str | None, str | None]] = {}
        todo = []
        for gold, pred in dict.fromkeys(jobs):
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
                    w.job = (gold, pred)
                    w.deadline = time.monotonic() + (self.timeout if w.ready else STARTUP_TIMEOUT_S)
                    w.conn.send(((gold, pred), gold, pred))
                    busy[w.conn] = w
            now = time.monotonic()
            next_deadline = min(w.deadline for w in busy.values())
            ready = wait(list(busy), timeout=max(0.0, next_deadline - now))
            for conn in ready:
                w = busy.pop(conn)
                try:
                    msg = conn.recv()
                    if msg == READY:  # started: the check's own deadline begins now
                        w.ready, w.deadline = True, time.monotonic() + self.timeout
                        busy[conn] = w
                        continue
                    key, ok, err = msg
                except (EOFError, OSError):  # the worker died under the check (e.g. out of memory)
                    key, ok, err = w.job, None, "worker died"
                    self._replace(w)
                self._record(key, ok, err, results)
                w.job = None
            now = time.monotonic()
            for conn, w in list(busy.items()):
                if w.job is not None and now >= w.deadline:
                    busy.pop(conn)
                    job, started = w.job, w.ready
                    self._replace(w)
                    if started:
                        self.stats["timeouts"] += 1
                        self._record(job, None, "timeout", results)
                    else:  # an infrastructure fault, not the answer's
                        self._record(job, None, f"worker did not start within {STARTUP_TIMEOUT_S:g}s", results)
        return results

    def _record(self, job, ok, err, results) -> None:
        self.stats["checks"] += 1
        if err and err != "timeout":
            self.stats["errors"] += 1
        if err is None or err == "timeout":  # infrastructure faults are not the answer's: tried again next time
            self.cache[(CHECKER_VERSION, *job)] = (ok, err)
        results[job] = (ok, err)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        fresh = _Worker(self.ctx)
        w.conn, w.proc, w.job, w.ready = fresh.conn, fresh.proc, None, False

    def check_rows(self, rows: list[dict], fmt: FormatSpec) -> list[dict]:
        """Verdict columns (verdict, reason, detail, extracted) for sample rows."""
        verdicts = []
        for r in rows:
            # format and extraction only: the math comparison is deferred to the workers
            verdicts.append(check_sample(r.get("completion"), r.get("finish_reason"), r.get("answer"), fmt,
                                         r.get("error"), compare=False))
        res = self.compare_many(v.parts for v in verdicts if v.reason == "compare")
        for i, v in enumerate(verdicts):
            if v.reason != "compare":
                continue
            gold, pred = v.parts
            reason, err = res[(gold, pred)]
            if err and err != "timeout":
                verdicts[i] = type(v)("error", "checker_error", err, v.extracted)
            else:
                verdicts[i] = math_verdict(reason or err, gold, pred, self.timeout)
        return [{"verdict": v.verdict, "reason": v.reason, "detail": v.detail, "extracted": v.extracted} for v in verdicts]


def check_mixed_rows(pool: VerifierPool, rows: list[dict], fmt: FormatSpec, checker: str = "auto", code=None,
                     workers: int = 2, code_cache: dict | None = None) -> list[dict]:
    """Verdict columns for sample rows of either kind, as ``verify`` gives them: math rows
    through ``pool`` (its worker processes and hard deadline), code rows (``is_code_row``) run
    against their tests in the sandbox under ``code`` (a ``sandbox.CodeSpec``), ``workers`` at
    a time, repeated programs once through ``code_cache``."""
    code_idx = [i for i, r in enumerate(rows) if is_code_row(r, checker)]
    if not code_idx:
        return pool.check_rows(rows, fmt)
    out: list = [None] * len(rows)
    code_set = set(code_idx)
    math_idx = [i for i in range(len(rows)) if i not in code_set]
    for i, v in zip(math_idx, pool.check_rows([rows[i] for i in math_idx], fmt) if math_idx else []):
        out[i] = v
    for i, v in zip(code_idx, check_code_rows([rows[i] for i in code_idx], fmt, code, checker, workers, code_cache)):
        out[i] = v
    return out


class RowChecker:
    """Verdict columns for sample rows of either kind, in one place: math through a
    ``VerifierPool`` (worker processes, hard deadline), code in the sandbox. Stages run it as a
    Ray actor (``verify``'s actors; ``generate``'s adaptive rounds), so the checking happens on
    the cluster, not in the driver."""

    def __init__(self, workers: int, timeout: float):
        self.pool = VerifierPool(workers=workers, timeout=timeout)
        self.workers = workers
        self.code_cache: dict = {}
        self.code_checks = 0

    def check(self, rows: list[dict], fmt: dict, checker: str = "auto", code: dict | None = None) -> list[dict]:
        from .sandbox import CodeSpec

        out = check_mixed_rows(self.pool, rows, FormatSpec.model_validate(fmt), checker,
                               CodeSpec.model_validate(code or {}), self.workers, self.code_cache)
        self.code_checks += sum(is_code_row(r, checker) for r in rows)
        return out

    def stats(self) -> dict:
        return {**self.pool.stats, "code_checks": self.code_checks}


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))
