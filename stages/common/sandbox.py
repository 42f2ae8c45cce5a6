"""The code sandbox: runs untrusted Python (a completion's code) against a row's tests,
stdin/stdout pairs or function-call tests (HumanEval, MBPP), and says ``pass``, ``fail``,
``timeout`` or ``error``; ``error`` is an infrastructure or data fault, never a wrong answer.

The entry point is ``run_tests(program, tests, limits, kind)``, which returns ``{"verdict",
"reason", "detail", "kind", "tests", "passed", "failed_test", "seconds"}``. ``run_completion``
does the same for a completion's last fenced code block, ``check_code_sample`` in
``stages.common.checkers`` wraps it for the verify stage, and ``SandboxLimits`` (``CodeSpec``)
holds the limits.

Isolation, detected once per process by running a probe in it:

* **bubblewrap** (``bwrap`` 0.7+): new user, pid, network, IPC and UTS namespaces, the host
  filesystem read-only, a size-limited tmpfs as the only writable work folder;
* **util-linux unshare**: the same namespaces without root or a setuid helper; a wrapper run
  inside makes every mount read-only and drops the program's capabilities;
* neither: every check is ``error``/``no_isolation`` unless ``allow_unisolated: true``, which
  runs programs with the resource limits only.

Every run also gets rlimits (CPU, memory, processes, file size), a stdout cap and a wall-clock
limit, after which its whole process tree is killed. The programs that run inside the sandbox
(that wrapper, the probe, the function-call harness) are files in ``sandbox_programs/``,
shipped as package data. How each kind of test runs, the threat model, the limits of a run,
what it does not stop, and every verdict and reason: README.md, "The code sandbox".
"""
from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.resources import files

from pydantic import BaseModel, ConfigDict, Field

NOBODY = 65534  # the sandbox's uid/gid when the checker runs as root
WORKDIR_PREFIX = "distill-sbx-"
SETUP_TIMEOUT_S = 20.0  # starting namespaces and the wrapper; beyond it: error, not timeout
STDERR_TAIL = 4096


# what runs inside the sandbox is part of this module's code: the stages' cache keys cover it
CODE_FILES = sorted(str(f) for f in (files(__package__) / "sandbox_programs").iterdir() if f.name.endswith(".py"))


def _program(name: str) -> str:
    """The text of ``sandbox_programs/<name>``, a program that runs inside the sandbox (package data)."""
    return (files(__package__) / "sandbox_programs" / name).read_text(encoding="utf-8")


class SandboxLimits(BaseModel):
    """Limits for one program run (one test). ``CodeSpec`` is the same model, as the verify stage's ``code`` params."""

    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(5.0, gt=0, le=600, description="wall clock per test, from the program's start")
    cpu_seconds: int = Field(5, ge=1, description="RLIMIT_CPU per process")
    memory_mb: int = Field(1024, ge=64, description="RLIMIT_AS (address space) per process")
    max_processes: int = Field(16, ge=1, description="RLIMIT_NPROC: tasks (threads too) alive, the program included")
    max_file_mb: int = Field(10, ge=0, description="RLIMIT_FSIZE; the work folder holds about as much in all")
    max_output_bytes: int = Field(1 << 20, ge=1, description="stdout cap; beyond it the run is killed (output_limit)")
    allow_unisolated: bool = Field(False, description="run with rlimits only when no namespace sandbox works")
    python: str | None = Field(None, description="interpreter for programs; default: the first that works in the sandbox")


CodeSpec = SandboxLimits


# --------------------------------------------------------------------------- programs and tests

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)


def extract_program(completion: str | None) -> str | None:
    """The last fenced code block (```` ```python ```` or plain ```` ``` ````), or None.

    A fence must start a line; the closing fence is the next line that is only a fence.
    Blocks tagged with another language than python (``bash``, ``text``...) are skipped
    unless no python/untagged block exists."""
    if not completion:
        return None
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    py = [code for lang, code in blocks if lang in ("", "python", "py", "python3")]
    chosen = py or [code for _, code in blocks]
    if not chosen or not chosen[-1].strip():
        return None
    return chosen[-1]


def parse_tests(tests) -> list[dict]:
    """Tests as ``[{"input": str, "output": str}, ...]`` from a JSON string or a list;
    ``{"inputs": [...], "outputs": [...]}`` (APPS style) works too. Raises ValueError."""
    if isinstance(tests, (str, bytes)):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as e:
            raise ValueError(f"tests are not JSON: {e}") from None
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        if len(tests["inputs"]) != len(tests["outputs"]):
            raise ValueError("inputs and outputs differ in length")
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    if not isinstance(tests, list) or not tests:
        raise ValueError("no tests")
    out = []
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or "output" not in t:
            raise ValueError(f"test {i} has no output")
        inp, exp = t.get("input", ""), t["output"]
        if isinstance(inp, list):
            inp = "\n".join(map(str, inp)) + "\n"
        if isinstance(exp, list):
            exp = "\n".join(map(str, exp))
        if not isinstance(inp, str) or not isinstance(exp, str):
            raise ValueError(f"test {i}: input and output must be strings")
        out.append({"input": inp, "output": exp})
    return out


def _lines(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def outputs_match(got: str, expected: str) -> bool:
    """Exact match after trimming trailing whitespace on each line and trailing empty lines."""
    return _lines(got) == _lines(expected)



# --------------------------------------------------------------------------- function-call tests

STDIO, FUNCTION_CALL = "stdio", "function_call"
_KIND_ALIASES = {"stdio": STDIO, "stdin": STDIO, "io": STDIO, "function_call": FUNCTION_CALL, "call": FUNCTION_CALL,
                 "functional": FUNCTION_CALL, "function": FUNCTION_CALL, "assert": FUNCTION_CALL,
                 "asserts": FUNCTION_CALL}


def test_kind(kind: str | None) -> str | None:
    """The canonical name of a test kind (``stdio`` or ``function_call``; aliases such as
    ``call``, ``functional``, ``stdin`` accepted), None for None. Raises ValueError."""
    if kind is None:
        return None
    k = _KIND_ALIASES.get(str(kind).strip().lower())
    if k is None:
        raise ValueError(f"unknown test kind {kind!r} (expected one of: stdio, function_call)")
    return k


@dataclass
class CallTests:
    """Function-call tests: Python ``code`` run after the program in its namespace; then, when
    ``entry_point`` is set and the code defines ``check``, ``check(<entry_point>)`` (HumanEval)."""

    code: str
    entry_point: str | None = None
    setup: str = ""


# call-based cases (APPS ``fn_name``, LiveCodeBench functional): each case is one assert line,
# using these helpers (``_distill_eq``, ``_distill_fn``) set up before the tests
_CALL_CASE_HELPERS = _program("call_case_helpers.py")


def _call_cases(t: dict) -> CallTests:
    """Call-based cases: ``{"fn_name", "inputs": [[args...], ...], "outputs": [...]}`` (APPS;
    an output wrapped in a one-element list matches too), or ``{"fn_name", "tests":
    [{"input": "<one JSON value per line>", "output": "<JSON>"}, ...]}`` (LiveCodeBench
    functional). The function is ``Solution().<fn_name>`` when the program has that class."""
    name = t["fn_name"]
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"fn_name must be a function name, got {name!r}")
    if "tests" in t:
        cases = t["tests"]
        if not isinstance(cases, list) or not all(isinstance(c, dict) and "input" in c and "output" in c for c in cases):
            raise ValueError("tests must be a list of {input, output}")
        try:
            args = [[json.loads(line) for line in str(c["input"]).splitlines() if line.strip()] for c in cases]
            outs = [json.loads(c["output"]) if isinstance(c["output"], str) else c["output"] for c in cases]
        except ValueError as e:
            raise ValueError(f"functional test input/output is not JSON: {e}") from None
    else:
        args, outs = t.get("inputs"), t.get("outputs")
        if not isinstance(args, list) or not isinstance(outs, list) or len(args) != len(outs):
            raise ValueError("inputs and outputs must be lists of the same length")
        args = [a if isinstance(a, list) else [a] for a in args]
    if not args:
        raise ValueError("no tests")
    lines = [f"assert _distill_eq(_distill_fn({name!r})(*{a!r}), {o!r})" for a, o in zip(args, outs)]
    return CallTests("\n".join(lines), None, _CALL_CASE_HELPERS.strip())


def _call_tests(t) -> CallTests | None:
    """``t`` as function-call tests, or None when it is not in a function-call shape."""
    if isinstance(t, list) and t and all(isinstance(x, str) for x in t):  # MBPP-style list of asserts
        return CallTests("\n".join(t))
    if not isinstance(t, dict):
        return None
    if "fn_name" in t:
        return _call_cases(t)
    kind = t.get("kind", t.get("type", t.get("testtype")))
    if kind is not None and test_kind(kind) != FUNCTION_CALL:
        return None
    entry = t.get("entry_point")
    if entry is not None and (not isinstance(entry, str) or not entry.isidentifier()):
        raise ValueError(f"entry_point must be a function name, got {entry!r}")
    setup = t.get("test_setup_code") or t.get("setup") or ""
    imports = t.get("test_imports") or []
    if isinstance(imports, str):
        imports = [imports]
    if not isinstance(setup, str) or not all(isinstance(x, str) for x in imports):
        raise ValueError("test_setup_code/setup and test_imports must be strings")
    setup = "\n".join([*imports, setup]).strip()
    if "test_list" in t:  # MBPP
        asserts = t["test_list"]
        if not isinstance(asserts, list) or not asserts or not all(isinstance(x, str) for x in asserts):
            raise ValueError("test_list must be a non-empty list of strings")
        return CallTests("\n".join(asserts), entry, setup)
    code = t.get("test", t.get("code", t.get("asserts")))
    if isinstance(code, list) and all(isinstance(x, str) for x in code):
        code = "\n".join(code)
    if code is None and kind is None:
        return None
    if not isinstance(code, str) or not code.strip():
        raise ValueError("function-call tests need their Python code in `test` (or `code`, `test_list`)")
    return CallTests(code, entry, setup)


def parse_test_suite(tests, kind: str | None = None) -> tuple[str, list[dict] | CallTests]:
    """``(kind, tests)``: ``("stdio", [{"input", "output"}, ...])`` or ``("function_call",
    CallTests)``. Function-call tests are a HumanEval row's ``{"test": "def check(candidate):
    ...", "entry_point": "f"}``, an MBPP row's ``{"test_list": ["assert f(1) == 2", ...],
    "test_setup_code": ...}``, ``{"kind": "function_call", "code": ...}``, a list of assert
    strings, call-based cases with ``fn_name`` (APPS, LiveCodeBench functional; see
    ``_call_cases``), or, with ``kind="function_call"``, plain Python code; any of them as
    JSON too.
    ``kind`` (a row's ``test_kind``) must agree with the shape when given. Raises ValueError."""
    kind = test_kind(kind)
    if isinstance(tests, (str, bytes)):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as e:
            if kind != FUNCTION_CALL:
                raise ValueError(f"tests are not JSON: {e}") from None
            tests = {"code": tests if isinstance(tests, str) else tests.decode("utf-8", "replace")}
        if isinstance(tests, str) and kind == FUNCTION_CALL:
            tests = {"code": tests}
    call = _call_tests(tests)
    if call is not None:
        if kind == STDIO:
            raise ValueError("test_kind is stdio but the tests are function-call tests")
        return FUNCTION_CALL, call
    if kind == FUNCTION_CALL:
        raise ValueError("test_kind is function_call but the tests are not Python test code "
                         "(HumanEval `test` + `entry_point`, MBPP `test_list`, or a list of asserts)")
    return STDIO, parse_tests(tests)


# Runs in the sandbox as the program (``python -I prog.py``): reads the run's token from stdin
# (the only copy; stdin is then empty), runs the program, then the tests, in one namespace
# (``__name__`` is not ``"__main__"``, so a program's own ``if __name__ == "__main__":`` demo
# does not run), and reports on stdout in a last line ``<token> PASS|FAIL|ERROR <json detail>``.
# A program that exits, or kills its process, before the tests finish never prints the token.
# ``sandbox_programs/call_harness.py`` is the harness as it runs but for its last line, the call
# with this run's program and tests; its ``%`` are doubled here so only those four are substituted.
CALL_HARNESS = (_program("call_harness.py").replace("%", "%%")
                + "_run(_t, %(program)r, %(setup)r, %(tests)r, %(entry)r)\n")


def call_harness(program: str, tests: CallTests) -> str:
    """The script run in the sandbox for ``program`` with function-call ``tests``."""
    return CALL_HARNESS % {"program": program, "setup": tests.setup, "tests": tests.code, "entry": tests.entry_point}


# --------------------------------------------------------------------------- the in-sandbox wrapper

# ``sandbox_programs/wrapper.py`` runs as ``python -I -S -c WRAPPER CFG`` inside the namespaces
# (pid 1 there). Reports on the status fd, line by line: ``ok`` (the program is about to exec),
# ``exit N`` or ``signal N`` (how it ended), ``error MSG`` (setup failed). The program never
# sees the status fd (close-on-exec), so it cannot forge these lines.
WRAPPER = _program("wrapper.py")


# --------------------------------------------------------------------------- isolation detection

@dataclass(frozen=True)
class Isolation:
    """How programs are run: ``backend`` is ``bwrap``, ``unshare`` or ``none``."""

    backend: str
    python: str
    uid: int | None  # run as this uid/gid (root only), else None
    detail: str = ""

    def command(self, cfg_json: str, workdir: str, folder_bytes: int) -> list[str]:
        inner = [self.python, "-I", "-S", "-c", WRAPPER, cfg_json]
        if self.backend == "bwrap":
            prog = os.path.join(workdir, "prog.py")
            return [_bwrap(), "--unshare-all", "--unshare-user", "--die-with-parent", "--ro-bind", "/", "/",
                    "--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc",
                    "--size", str(folder_bytes), "--tmpfs", workdir, "--ro-bind", prog, prog,
                    "--chdir", workdir, "--", *inner]
        if self.backend == "unshare":
            return [_unshare(), "--user", "--map-root-user", "--net", "--ipc", "--uts", "--pid", "--fork",
                    "--mount-proc", "--kill-child", "--", *inner]
        return inner


def _bwrap() -> str | None:
    return shutil.which("bwrap")


def _unshare() -> str | None:
    return shutil.which("unshare")


# ``sandbox_programs/probe.py``: what ``_probe`` checks (interfaces, a connect to 127.0.0.1, ``/``
# read-only, the work folder writable, the capabilities), printed as JSON
_PROBE = _program("probe.py")

_isolation_cache: dict[tuple, Isolation | None] = {}
_isolation_errors: dict[tuple, str] = {}
_isolation_lock = threading.Lock()


def _python_candidates(python: str | None) -> list[str]:
    if python:
        return [python]
    seen, out = set(), []
    for p in (sys.executable, getattr(sys, "_base_executable", None), "/usr/bin/python3", "/usr/local/bin/python3"):
        if p and os.path.exists(p) and os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            out.append(p)
    return out


def _probe(iso: Isolation) -> str | None:
    """None when ``iso`` works and isolates; else what is wrong."""
    run = _execute(iso, _PROBE, "", SandboxLimits(timeout_s=10))
    if run.setup_error:
        return run.setup_error
    if run.exit_code != 0:
        return f"probe exited {run.exit_code}/{run.signal}: {run.stderr_tail[-300:]!r}"
    try:
        r = json.loads(run.stdout)
    except ValueError:
        return f"probe printed {run.stdout[:200]!r}"
    if not r.get("writable"):
        return "work folder not writable"
    if iso.backend == "none":
        return None
    if set(r["ifaces"]) - {"lo"} or r["connect"] == "connected":
        return f"network reachable (interfaces {r['ifaces']})"
    if not r["ro"]:
        return "root filesystem writable"
    if int(r["capeff"], 16):
        return f"program keeps capabilities {r['capeff']}"
    return None


def detect_isolation(python: str | None = None, allow_unisolated: bool = False) -> Isolation | None:
    """The first sandbox that works here (probed once per interpreter choice, cached);
    with ``allow_unisolated``, a plain rlimits-only runner when none does."""
    key = (python,)
    with _isolation_lock:
        if key not in _isolation_cache:
            uid = NOBODY if os.geteuid() == 0 else None
            found, errors = None, []
            backends = [b for b, tool in (("bwrap", _bwrap()), ("unshare", _unshare())) if tool]
            for backend in backends:
                for py in _python_candidates(python):
                    iso = Isolation(backend, py, uid)
                    err = _probe(iso)
                    if err is None:
                        found = iso
                        break
                    errors.append(f"{backend} with {py}: {err}")
                if found:
                    break
            _isolation_cache[key] = found
            _isolation_errors[key] = "; ".join(errors) if backends else "neither bwrap nor unshare found"
        found = _isolation_cache[key]
        if found is not None or not allow_unisolated:
            return found
        ukey = (python, "unisolated")
        if ukey not in _isolation_cache:
            uid = NOBODY if os.geteuid() == 0 else None
            found = None
            for py in _python_candidates(python):
                iso = Isolation("none", py, uid, "no namespaces: rlimits only")
                if _probe(iso) is None:
                    found = iso
                    break
            _isolation_cache[ukey] = found
        return _isolation_cache[ukey]


def isolation_error(python: str | None = None) -> str:
    """Why ``detect_isolation(python)`` found nothing (after it ran)."""
    return _isolation_errors.get((python,), "")


# --------------------------------------------------------------------------- one run

@dataclass
class RunResult:
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr_tail: str = ""
    output_overflow: bool = False
    timed_out: bool = False
    setup_error: str | None = None
    seconds: float = 0.0
    workdir: str = ""
    stdout_bytes: int = 0
    status_lines: list[str] = field(default_factory=list)
    leader_status: int | None = None  # exit status (or signal) of unshare/bwrap/the wrapper


def _make_workdir() -> str:
    return tempfile.mkdtemp(prefix=WORKDIR_PREFIX)


def _remove_tree(path: str) -> None:
    def onerror(func, p, exc):  # a program may chmod its folders to 000
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        try:
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


def _rlimits(limits: SandboxLimits, iso: Isolation) -> list[tuple[str, int, int]]:
    mb = 1 << 20
    out = [
        ("RLIMIT_CPU", limits.cpu_seconds, limits.cpu_seconds + 1),
        ("RLIMIT_AS", limits.memory_mb * mb, limits.memory_mb * mb),
        ("RLIMIT_FSIZE", limits.max_file_mb * mb, limits.max_file_mb * mb),
        ("RLIMIT_NOFILE", 256, 256),
        ("RLIMIT_CORE", 0, 0),
    ]
    if iso.backend != "none":
        # counted per (user namespace, uid): the two helpers in the namespace (unshare or
        # bwrap's init, and the wrapper) count too
        out.append(("RLIMIT_NPROC", limits.max_processes + 2, limits.max_processes + 2))
    elif iso.uid is not None:
        # no namespace: every process of the sandbox uid (nobody) on the machine counts
        out.append(("RLIMIT_NPROC", limits.max_processes + 1, limits.max_processes + 1))
    # (unisolated as an ordinary user: no NPROC limit, it would count all of the user's processes)
    return out


def _hunt(marker: str) -> int:
    """SIGKILL processes whose environment carries ``marker``; how many were found."""
    me, found = os.getpid(), 0
    needle = f"DISTILL_SANDBOX={marker}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read():
                    found += 1
                    os.kill(int(name), signal.SIGKILL)
        except OSError:
            pass
    return found


def _reap(marker: str, wait_s: float = 10.0) -> None:
    """Kill every process of a run and wait (bounded) until none is left: a namespace being
    torn down, or, without one, descendants that left the process group."""
    end = time.monotonic() + wait_s
    while _hunt(marker) and time.monotonic() < end:
        time.sleep(0.01)


def _execute(iso: Isolation, program: str, stdin: str, limits: SandboxLimits) -> RunResult:
    """Run ``program`` once in a fresh work folder under ``iso``."""
    res = RunResult()
    workdir = _make_workdir()
    res.workdir = workdir
    status_r = status_w = -1
    proc = None
    t0 = time.monotonic()
    try:
        prog_path = os.path.join(workdir, "prog.py")
        with open(prog_path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(program)
        os.chmod(prog_path, 0o644)
        if iso.uid is not None:
            os.chown(workdir, iso.uid, iso.uid)
            os.chown(prog_path, iso.uid, iso.uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8", "DISTILL_SANDBOX": workdir}
        status_r, status_w = os.pipe()
        cfg = {"workdir": workdir, "program": prog_path, "python": iso.python, "env": env, "status_fd": status_w,
               "readonly": iso.backend == "unshare", "drop_caps": iso.backend == "unshare",
               "rlimits": _rlimits(limits, iso), "folder_bytes": (limits.max_file_mb + 1) << 20}
        extra = {"user": iso.uid, "group": iso.uid, "extra_groups": []} if iso.uid is not None else {}
        try:
            proc = subprocess.Popen(iso.command(json.dumps(cfg), workdir, cfg["folder_bytes"]), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
                                    start_new_session=True, cwd=workdir, env=env, **extra)
        except OSError as e:
            res.setup_error = f"cannot start sandbox: {e}"
            return res
        finally:
            os.close(status_w)
        _pump(proc, status_r, stdin.encode("utf-8", "replace"), limits, res)
    finally:
        try:
            if proc is not None:
                try:  # the group leader is not reaped yet, so its pgid cannot have been reused
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                for f in (proc.stdin, proc.stdout, proc.stderr):
                    try:
                        f.close()
                    except OSError:
                        pass
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed already
                    pass
            if status_r >= 0:
                os.close(status_r)
            if iso.backend == "none" or res.timed_out or res.output_overflow or res.setup_error:
                _reap(workdir)
        finally:
            _remove_tree(workdir)
        res.seconds = time.monotonic() - t0
    return res


def _pump(proc: subprocess.Popen, status_r: int, data: bytes, limits: SandboxLimits, res: RunResult) -> None:
    """Feed stdin, read stdout (capped), stderr (tail) and the status fd until the run ends or a limit is hit."""
    sel = selectors.DefaultSelector()
    out_fd, err_fd, in_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    for fd in (out_fd, err_fd, status_r):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    if data:
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    out, err, status = bytearray(), bytearray(), bytearray()
    try:
        _pump_loop(proc, sel, (in_fd, out_fd, err_fd, status_r), data, limits, res, out, err, status)
    finally:
        sel.close()
        res.stdout = out.decode("utf-8", "replace")
        res.stderr_tail = err[-STDERR_TAIL:].decode("utf-8", "replace")
        res.status_lines = status.decode("utf-8", "replace").splitlines()
    if res.output_overflow or res.timed_out or res.setup_error:
        return
    for line in res.status_lines:
        kind, _, rest = line.partition(" ")
        if kind == "exit":
            res.exit_code = int(rest)
        elif kind == "signal":
            res.signal = int(rest)
        elif kind == "error" and not res.setup_error:
            res.setup_error = rest
    if res.exit_code is None and res.signal is None and not res.setup_error:
        # the wrapper never reported: the sandbox could not start (e.g. unshare failed)
        res.setup_error = f"sandbox exited {res.leader_status} without a result: {res.stderr_tail[-500:]}"


def _pump_loop(proc, sel, fds, data, limits, res, out, err, status) -> None:
    """Serve the run's pipes until all are closed or a limit is hit, then wait for the sandbox's leader."""
    in_fd, out_fd, err_fd, _ = fds
    sent = 0
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    started = False
    finished = False
    while sel.get_map():
        now = time.monotonic()
        if now >= deadline:
            if finished:  # the program ended; what is left holding the pipes gets killed
                break
            _expired(res, started, f"sandbox did not start within {SETUP_TIMEOUT_S:g}s")
            return
        for key, _ in sel.select(deadline - now):
            fd = key.fd
            if fd == in_fd:
                sent = _feed_stdin(proc, sel, in_fd, data, sent)
                continue
            chunk = _read_chunk(sel, fd)
            if not chunk:
                continue
            if fd == out_fd:
                if not _take_stdout(chunk, limits, res, out):
                    return
            elif fd == err_fd:
                err += chunk
                if len(err) > 2 * STDERR_TAIL:
                    del err[:-STDERR_TAIL]
            else:
                status += chunk
                started, finished, deadline = _on_status(status, started, finished, deadline, limits)
    if not _wait_leader(proc, deadline, res) and not finished:
        _expired(res, started, "sandbox did not start")


def _expired(res: RunResult, started: bool, not_started: str) -> None:
    """A limit ran out: a timeout once the program has started, before that a sandbox that did not start."""
    if started:
        res.timed_out = True
    else:
        res.setup_error = not_started


def _feed_stdin(proc: subprocess.Popen, sel, in_fd: int, data: bytes, sent: int) -> int:
    """Write the next piece of stdin without blocking, closing it when all is sent; how much is sent now."""
    try:
        sent += os.write(in_fd, data[sent : sent + 65536])
    except BlockingIOError:
        return sent
    except OSError:  # the program closed its stdin or exited
        sent = len(data)
    if sent >= len(data):
        sel.unregister(in_fd)
        proc.stdin.close()
    return sent


def _read_chunk(sel, fd: int) -> bytes:
    """Up to 64 KiB from ``fd``; empty when nothing is ready, or at its end (then it is unregistered)."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return b""
    if not chunk:
        sel.unregister(fd)
    return chunk


def _take_stdout(chunk: bytes, limits: SandboxLimits, res: RunResult, out: bytearray) -> bool:
    """Keep a piece of stdout; False, with ``output_overflow`` set, once past ``max_output_bytes``."""
    res.stdout_bytes += len(chunk)
    if res.stdout_bytes > limits.max_output_bytes:
        res.output_overflow = True
        return False
    out += chunk
    return True


def _on_status(status: bytearray, started: bool, finished: bool, deadline: float,
               limits: SandboxLimits) -> tuple[bool, bool, float]:
    """``(started, finished, deadline)`` after the wrapper's status lines so far."""
    if not started and b"ok\n" in status:
        started = True
        deadline = time.monotonic() + limits.timeout_s
    if not finished and re.search(rb"^(exit|signal|error) ", status, re.MULTILINE):
        # the program is gone; give its last output a moment to arrive (descendants
        # that outlive it, possible only without a pid namespace, are not waited for)
        finished = True
        deadline = min(deadline, time.monotonic() + 0.5)
    return started, finished, deadline


def _wait_leader(proc: subprocess.Popen, deadline: float, res: RunResult) -> bool:
    """Whether the sandbox's leader exited by ``deadline`` (0.1 s at least); it is not reaped."""
    # every pipe is closed: the namespace (or the process tree) is gone; wait for the leader
    # to exit, without reaping it: until it is reaped its pid, and so the process group id
    # the caller kills, cannot be reused
    end = max(deadline, time.monotonic() + 0.1)
    while True:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = True
        if info is not None:
            res.leader_status = getattr(info, "si_status", None)
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.005)


# --------------------------------------------------------------------------- verdicts

def _short(s: str, n: int = 200) -> str:
    s = repr(s)
    return s if len(s) <= n else s[: n - 3] + "..."


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def classify(run: RunResult, expected: str, limits: SandboxLimits) -> tuple[str, str, str]:
    """(verdict, reason, detail) for one test run."""
    if run.setup_error:
        return "error", "sandbox_error", run.setup_error[:500]
    if run.output_overflow:
        return "fail", "output_limit", f"more than {limits.max_output_bytes} bytes of output"
    if run.timed_out:
        return "timeout", "time_limit", f"still running after {limits.timeout_s:g}s"
    if run.signal is not None:
        if run.signal == signal.SIGXCPU:
            return "timeout", "cpu_limit", f"used more than {limits.cpu_seconds}s of CPU"
        if run.signal == signal.SIGXFSZ:
            return "fail", "file_size_limit", f"wrote a file beyond {limits.max_file_mb} MB"
        try:
            name = signal.Signals(run.signal).name
        except ValueError:
            name = str(run.signal)
        return "fail", "runtime_error", f"killed by {name}" + (f": {_last_line(run.stderr_tail)}" if run.stderr_tail else "")
    if run.exit_code != 0:
        last = _last_line(run.stderr_tail)
        if "MemoryError" in run.stderr_tail:
            return "fail", "memory_limit", f"exit {run.exit_code}: {last}"
        if "File too large" in run.stderr_tail or "No space left on device" in run.stderr_tail:
            return "fail", "file_size_limit", f"exit {run.exit_code}: {last}"
        return "fail", "runtime_error", f"exit {run.exit_code}" + (f": {last}" if last else "")
    if outputs_match(run.stdout, expected):
        return "pass", "ok", ""
    return "fail", "wrong_output", f"expected {_short(expected)}, got {_short(run.stdout)}"


def classify_call(run: RunResult, token: str, limits: SandboxLimits) -> tuple[str, str, str]:
    """(verdict, reason, detail) for one run of the function-call harness (``CALL_HARNESS``)."""
    status, detail = None, ""
    marker = token + " "
    for line in reversed(run.stdout.splitlines()):
        if line.startswith(marker):
            status, _, rest = line[len(marker):].partition(" ")
            try:
                detail = str(json.loads(rest))
            except ValueError:
                detail = rest
            break
    if run.setup_error or run.output_overflow or run.timed_out or run.signal is not None:
        return classify(run, "", limits)
    if status == "PASS" and run.exit_code == 0:
        return "pass", "ok", ""
    if status == "FAIL":
        return "fail", "wrong_output", detail
    if status == "ERROR":
        if "MemoryError" in detail:
            return "fail", "memory_limit", detail
        if "File too large" in detail or "No space left on device" in detail:
            return "fail", "file_size_limit", detail
        return "fail", "runtime_error", detail
    if run.exit_code != 0:
        return classify(run, "", limits)
    return "fail", "runtime_error", "the program ended the process before the tests finished"


def run_tests(program: str, tests, limits: SandboxLimits | None = None, kind: str | None = None) -> dict:
    """Run ``program`` against ``tests`` (see ``parse_test_suite``; ``kind`` is a row's
    ``test_kind``, checked against their shape). stdin/stdout tests: one run per ``{"input",
    "output"}`` test in order, stopping at the first that does not pass. Function-call tests:
    one run of the program followed by the test code in the same process, under the same
    limits. Returns ``{"verdict", "reason", "detail", "kind", "tests", "passed",
    "failed_test", "seconds"}``; verdicts and reasons: README.md, "The code sandbox"."""
    import secrets

    limits = limits or SandboxLimits()
    t0 = time.monotonic()
    n_tests, suite_kind = 0, None

    def result(verdict, reason, detail, passed=0, failed=None):
        return {"verdict": verdict, "reason": reason, "detail": detail, "kind": suite_kind, "tests": n_tests,
                "passed": passed, "failed_test": failed, "seconds": round(time.monotonic() - t0, 3)}

    try:
        suite_kind, suite = parse_test_suite(tests, kind)
    except ValueError as e:
        return result("error", "bad_tests", str(e))
    n_tests = len(suite) if suite_kind == STDIO else 1
    iso = detect_isolation(limits.python, limits.allow_unisolated)
    if iso is None:
        why = isolation_error(limits.python)
        return result("error", "no_isolation", "no network isolation available" + (f" ({why})" if why else ""))
    if suite_kind == FUNCTION_CALL:
        token = secrets.token_hex(16)
        run = _execute(iso, call_harness(program, suite), token + "\n", limits)
        verdict, reason, detail = classify_call(run, token, limits)
        return result(verdict, reason, detail, int(verdict == "pass"), None if verdict == "pass" else 0)
    for i, t in enumerate(suite):
        run = _execute(iso, program, t["input"], limits)
        verdict, reason, detail = classify(run, t["output"], limits)
        if verdict != "pass":
            prefix = f"test {i + 1}/{len(suite)}: " if len(suite) > 1 else ""
            return result(verdict, reason, prefix + detail if detail else prefix.rstrip(": "), i, i)
    return result("pass", "ok", "", len(suite))


def run_completion(completion: str | None, tests, limits: SandboxLimits | None = None, kind: str | None = None) -> dict:
    """``run_tests`` on the last fenced code block of ``completion`` (``fail``/``no_code_block`` without one)."""
    program = extract_program(completion)
    if program is None:
        return {"verdict": "fail", "reason": "no_code_block", "detail": "no fenced code block in the completion",
                "kind": None, "tests": 0, "passed": 0, "failed_test": None, "seconds": 0.0}
    return run_tests(program, tests, limits, kind)
