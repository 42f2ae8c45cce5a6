"""The code sandbox: verdicts for well- and ill-behaved programs, and nothing left behind.

Every test that runs a program also checks, afterwards, that no process of any run is
alive (no process anywhere carries a run's ``DISTILL_SANDBOX`` environment marker) and
that no run's work folder is left in the temp folder. The battery runs on each sandbox
backend available here (``unshare``; ``bwrap`` when it is on PATH).
"""
import glob
import json
import os
import resource
import shutil
import socket
import tempfile
import textwrap
import uuid

import pytest
from conftest import USERNS_BLOCKED
from pydantic import ValidationError

from stages.common import sandbox as sb
from stages.common.sandbox import SandboxLimits, extract_program, outputs_match, parse_tests, run_completion, run_tests

# limits for programs meant to finish: roomy, so a loaded machine's slow Python start-up is not a timeout
# (the tests of the limits themselves set theirs)
FAST = SandboxLimits(timeout_s=10, cpu_seconds=10)


def _marked_processes() -> list[str]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        for part, needle in (("environ", b"DISTILL_SANDBOX="), ("cmdline", sb.WORKDIR_PREFIX.encode())):
            try:
                with open(f"/proc/{name}/{part}", "rb") as f:
                    if needle in f.read():
                        out.append(name)
                        break
            except OSError:
                pass
    return out


def _workdirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), sb.WORKDIR_PREFIX + "*")))


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before = _workdirs()
    yield
    assert _marked_processes() == [], "a sandboxed process survived its run"
    assert _workdirs() <= before, "a work folder was left behind"


@pytest.fixture(params=["unshare", "bwrap"])
def backend(request, monkeypatch):
    """Force one backend: the detection cache is emptied and the other tool hidden."""
    name = request.param
    if name == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("bwrap not installed")
    if name == "unshare":
        monkeypatch.setattr(sb, "_bwrap", lambda: None)
    monkeypatch.setattr(sb, "_isolation_cache", {})
    monkeypatch.setattr(sb, "_isolation_errors", {})
    iso = sb.detect_isolation()
    if iso is None:
        if name == "bwrap" and _userns_blocked():  # the one skip CI allows (see conftest), named as such
            pytest.skip(f"bubblewrap variant: {USERNS_BLOCKED} ({sb.isolation_error()})")
        pytest.skip(f"no sandbox here: {sb.isolation_error()}")
    assert iso.backend == name
    return iso


def _userns_blocked() -> bool:
    """Whether this kernel refuses a new user namespace (sysctls set to 0, or bwrap's own probe
    failing on the namespace); bwrap cannot isolate anything then."""
    import subprocess

    for knob in ("/proc/sys/kernel/unprivileged_userns_clone", "/proc/sys/user/max_user_namespaces"):
        try:
            if open(knob).read().strip() == "0":
                return True
        except OSError:
            pass
    probe = subprocess.run([shutil.which("bwrap"), "--unshare-user", "--ro-bind", "/", "/", "true"],
                           capture_output=True, text=True, timeout=60)
    return probe.returncode != 0 and any(w in probe.stderr.lower() for w in ("namespace", "uid map", "not permitted"))


def prog(src: str) -> str:
    return textwrap.dedent(src).strip() + "\n"


def one(program: str, expected: str = "", stdin: str = "", limits: SandboxLimits = FAST) -> dict:
    return run_tests(program, [{"input": stdin, "output": expected}], limits)


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.3)
    yield srv
    srv.close()


def assert_never_connected(srv: socket.socket) -> None:
    with pytest.raises(socket.timeout):
        conn, _ = srv.accept()
        conn.close()


# --------------------------------------------------------------------------- pure helpers

def test_extract_program_takes_the_last_python_block():
    text = "think\n```python\nprint(1)\n```\nthen\n```\nprint(2)\n```\nand shell:\n```bash\nls\n```\n"
    assert extract_program(text) == "print(2)\n"
    assert extract_program("```py\nx = 1\n```") == "x = 1\n"
    assert extract_program("```bash\necho hi\n```") == "echo hi\n"  # only other languages: the last block
    assert extract_program("no code here") is None
    assert extract_program("```python\nprint(1)\n") is None  # unterminated
    assert extract_program("inline ```print(1)``` is not a block") is None
    assert extract_program(None) is None


def test_outputs_match_trims_trailing_whitespace_only():
    assert outputs_match("1 2  \n3\t\n\n\n", "1 2\n3")
    assert outputs_match("a\r\nb\r\n", "a\nb\n")
    assert not outputs_match("1\n2", "1\n2\n3")  # a prefix of the expected lines
    assert not outputs_match("1\n2\n3", "1\n2")  # more lines than expected
    assert not outputs_match("1\n2\n\n3", "1\n2\n")  # more after an empty line
    assert not outputs_match(" 1", "1")  # leading whitespace counts
    assert not outputs_match("1\n\n2", "1\n2")  # inner empty lines count


def test_parse_tests_forms():
    assert parse_tests('[{"input": "1\\n", "output": "2"}]') == [{"input": "1\n", "output": "2"}]
    assert parse_tests({"inputs": ["a", "b"], "outputs": ["A", "B"]}) == [
        {"input": "a", "output": "A"}, {"input": "b", "output": "B"}]
    for bad in ("not json", "[]", [{"input": "x"}], {"inputs": ["a"], "outputs": []}, [{"input": 1, "output": "x"}]):
        with pytest.raises(ValueError):
            parse_tests(bad)
    assert run_tests("print(1)", "[]")["reason"] == "bad_tests"


def test_config_forbids_unknown_keys():
    with pytest.raises(ValidationError):
        SandboxLimits(timeout=3)
    assert sb.CodeSpec is SandboxLimits and SandboxLimits().allow_unisolated is False


# --------------------------------------------------------------------------- well-behaved programs

def test_correct_program_passes_every_test(backend):
    src = prog("""
        a, b = map(int, input().split())
        print(a + b)
    """)
    tests = [{"input": f"{a} {b}\n", "output": f"{a + b}\n"} for a, b in [(1, 2), (10, 20), (-5, 5)]]
    r = run_tests(src, tests, FAST)
    assert (r["verdict"], r["reason"], r["passed"], r["tests"]) == ("pass", "ok", 3, 3)


def test_stops_at_the_first_failing_test(backend):
    src = "n = int(input())\nprint(n * 2 if n < 3 else n)\n"
    tests = [{"input": f"{n}\n", "output": f"{n * 2}\n"} for n in (1, 2, 3, 4)]
    r = run_tests(src, tests, FAST)
    assert (r["verdict"], r["reason"], r["passed"], r["failed_test"]) == ("fail", "wrong_output", 2, 2)
    assert r["detail"].startswith("test 3/4: expected '6\\n', got '3\\n'")


def test_prefix_of_expected_lines_fails(backend):
    r = one("print(1)\nprint(2)\n", "1\n2\n3\n")
    assert (r["verdict"], r["reason"]) == ("fail", "wrong_output")


def test_trailing_whitespace_differences_pass(backend):
    r = one("print('1 2   ')\nprint('3\\t')\nprint()\nprint()\n", "1 2\n3")
    assert (r["verdict"], r["reason"]) == ("pass", "ok")


def test_nonzero_exit_fails_even_with_right_output(backend):
    r = one("print(3)\nexit(3)\n", "3")
    assert (r["verdict"], r["reason"], r["detail"]) == ("fail", "runtime_error", "exit 3")
    r = one("raise ValueError('boom')\n", "3")
    assert (r["verdict"], r["reason"]) == ("fail", "runtime_error") and "ValueError: boom" in r["detail"]


def test_no_code_block_fails():
    r = run_completion("I think the answer is print(3)", [{"input": "", "output": "3"}], FAST)
    assert (r["verdict"], r["reason"]) == ("fail", "no_code_block")


def test_completion_uses_its_last_block(backend):
    completion = "First try:\n```python\nprint(0)\n```\nFixed:\n```python\nprint(int(input()) + 1)\n```\n"
    assert run_completion(completion, [{"input": "41\n", "output": "42"}], FAST)["verdict"] == "pass"


def test_large_stdin_and_stdout_do_not_deadlock(backend):
    data = "x" * 999 + "\n"
    big = data * 3000  # 3 MB each way, through 64 KiB pipes
    limits = SandboxLimits(timeout_s=10, max_output_bytes=4 << 20)
    r = one("import sys\nsys.stdout.write(sys.stdin.read())\n", big, big, limits)
    assert (r["verdict"], r["reason"]) == ("pass", "ok")
    # a program that never reads its (large) stdin still finishes
    r = one("print('done')\n", "done", big, limits)
    assert (r["verdict"], r["reason"]) == ("pass", "ok")


def test_program_sees_a_private_writable_work_folder(backend):
    src = prog("""
        import os
        open("scratch.txt", "w").write("hi")
        print(open("scratch.txt").read(), os.environ["HOME"] == os.getcwd(), sorted(os.listdir(".")))
    """)
    r = one(src, "hi True ['prog.py', 'scratch.txt']")
    assert r["verdict"] == "pass", r


# --------------------------------------------------------------------------- ill-behaved programs

def test_infinite_loop_times_out(backend):
    r = one("while True:\n    pass\n", limits=SandboxLimits(timeout_s=1, cpu_seconds=5))
    assert (r["verdict"], r["reason"]) == ("timeout", "time_limit")


def test_cpu_limit(backend):
    r = one("while True:\n    pass\n", limits=SandboxLimits(timeout_s=8, cpu_seconds=1))
    assert (r["verdict"], r["reason"]) == ("timeout", "cpu_limit")  # before the 8 s wall clock


def test_sleeping_program_times_out(backend):
    r = one("import time\ntime.sleep(60)\n", limits=SandboxLimits(timeout_s=1))
    assert (r["verdict"], r["reason"]) == ("timeout", "time_limit")


def test_process_limit_is_exact_and_per_sandbox(backend):
    # children sleep on: they are alive while the parent counts, and must die with the run
    src = prog("""
        import os, time
        n = 0
        for _ in range(1000):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            n += 1
        print(n)
    """)
    limits = SandboxLimits(timeout_s=5, max_processes=8)
    r = one(src, "7", limits=limits)  # the program itself plus 7 children
    assert (r["verdict"], r["reason"]) == ("pass", "ok"), r


def test_fork_bomb_is_contained(backend):
    src = prog("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    r = one(src, limits=SandboxLimits(timeout_s=2, cpu_seconds=2, max_processes=16))
    assert r["verdict"] in ("timeout", "fail"), r
    # the machine still forks (no process table exhaustion), and nothing survives (fixture)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def test_daemonized_grandchild_does_not_survive(backend):
    src = prog("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        print("detached")
    """)
    r = one(src, "detached")
    assert (r["verdict"], r["reason"]) == ("pass", "ok")


def test_huge_file_hits_the_file_size_limit_and_the_folder_goes(backend, monkeypatch):
    made = []
    real = sb._make_workdir
    monkeypatch.setattr(sb, "_make_workdir", lambda: made.append(real()) or made[-1])
    src = prog("""
        chunk = b"x" * (1 << 20)
        with open("big.bin", "wb") as f:
            for _ in range(2048):  # 2 GB
                f.write(chunk)
    """)
    r = one(src, limits=SandboxLimits(timeout_s=10, max_file_mb=10))
    assert (r["verdict"], r["reason"]) == ("fail", "file_size_limit"), r
    assert len(made) == 1 and not os.path.exists(made[0])


def test_huge_allocation_is_a_memory_error(backend):
    r = one("x = bytearray(8 * 1024 ** 3)\nprint(len(x))\n", "8589934592")
    assert (r["verdict"], r["reason"]) == ("fail", "memory_limit") and "MemoryError" in r["detail"]


def test_network_is_unreachable(backend, listener):
    port = listener.getsockname()[1]
    src = prog(f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=2)
            print("connected")
        except OSError as e:
            print("blocked", e.errno)
    """)
    r = one(src, "connected")
    assert (r["verdict"], r["reason"]) == ("fail", "wrong_output") and "blocked" in r["detail"]
    assert_never_connected(listener)


def test_huge_output_is_cut_off_fast_and_in_bounded_memory(backend):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, a high-water mark
    src = prog("""
        import sys
        line = "x" * 999_999 + "\\n"
        for _ in range(100):  # 100 MB
            sys.stdout.write(line)
    """)
    r = one(src, limits=SandboxLimits(timeout_s=10, max_output_bytes=1 << 20))
    assert (r["verdict"], r["reason"]) == ("fail", "output_limit")  # cut off, not run to the wall clock
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 32 * 1024


def test_shell_via_ctypes_stays_inside(backend, listener):
    """``system()`` works (a shell is just more processes under the same limits), but what
    it runs cannot write outside the work folder or reach the network."""
    port = listener.getsockname()[1]
    marker = f"/tmp/distill-escape-{uuid.uuid4().hex}"
    src = prog(f"""
        import ctypes, sys
        libc = ctypes.CDLL(None)
        outside = libc.system(b"touch {marker} 2>/dev/null")
        net = libc.system(("%s -c 'import socket; socket.create_connection((\\"127.0.0.1\\", {port}), 2)' 2>/dev/null"
                           % sys.executable).encode())
        inside = libc.system(b"touch made_by_shell && test -f made_by_shell")
        print(outside != 0, net != 0, inside == 0)
    """)
    try:
        r = one(src, "True True True", limits=SandboxLimits(timeout_s=10))
        assert (r["verdict"], r["reason"]) == ("pass", "ok"), r
        assert not os.path.exists(marker)
        assert_never_connected(listener)
    finally:
        if os.path.exists(marker):
            os.unlink(marker)


def test_program_cannot_undo_the_read_only_filesystem(backend):
    src = prog("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        MS_REMOUNT, MS_BIND = 32, 4096
        rc = libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None)
        caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
        try:
            open("/etc/distill-sbx-test", "w")
            wrote = True
        except OSError:
            wrote = False
        print(rc, int(caps, 16), wrote)
    """)
    r = one(src, "-1 0 False")
    assert r["verdict"] == "pass", r


# --------------------------------------------------------------------------- no sandbox available

def test_no_isolation_is_an_error_unless_allowed(monkeypatch):
    monkeypatch.setattr(sb, "_bwrap", lambda: None)
    monkeypatch.setattr(sb, "_unshare", lambda: None)
    monkeypatch.setattr(sb, "_isolation_cache", {})
    monkeypatch.setattr(sb, "_isolation_errors", {})
    r = one("print(1)\n", "1")
    assert (r["verdict"], r["reason"]) == ("error", "no_isolation")
    assert "no network isolation available" in r["detail"]
    r = one("print(1)\n", "1", limits=SandboxLimits(timeout_s=2, allow_unisolated=True))
    assert (r["verdict"], r["reason"]) == ("pass", "ok")
    # without a pid namespace, a timeout still takes the whole tree down (checked by the fixture)
    src = prog("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
        time.sleep(60)
    """)
    r = one(src, limits=SandboxLimits(timeout_s=1, allow_unisolated=True))
    assert (r["verdict"], r["reason"]) == ("timeout", "time_limit")


def unshare_always_fails_double() -> str:
    """A test double of the ``unshare`` lookup: it finds ``/bin/false``, a tool that fails every probe."""
    return "/bin/false"


def test_failed_probe_is_an_error(monkeypatch):
    monkeypatch.setattr(sb, "_bwrap", lambda: None)
    monkeypatch.setattr(sb, "_unshare", unshare_always_fails_double)
    monkeypatch.setattr(sb, "_isolation_cache", {})
    monkeypatch.setattr(sb, "_isolation_errors", {})
    r = one("print(1)\n", "1")
    assert (r["verdict"], r["reason"]) == ("error", "no_isolation")
    assert "unshare" in r["detail"]


# --------------------------------------------------------------------------- verify-stage integration

GOOD = "<think>\nadd them\n</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\n"
BAD = "<think>\nmultiply\n</think>\n```python\na, b = map(int, input().split())\nprint(a * b)\n```\n"
ADD_TESTS = [{"input": "2 3\n", "output": "5\n"}, {"input": "1 1\n", "output": "2\n"}]


def test_check_code_sample_verdict_shape(backend):
    from stages.common.checkers import FormatSpec, check_code_sample

    fmt = FormatSpec()
    v = check_code_sample(GOOD, ADD_TESTS, FAST, "stop", fmt)
    assert (v.verdict, v.reason, v.detail) == ("correct", "ok", "") and "print(a + b)" in v.extracted
    v = check_code_sample(BAD, json.dumps(ADD_TESTS), FAST, "stop", fmt)
    assert (v.verdict, v.reason) == ("rejected", "wrong_output") and v.detail.startswith("test 1/2: expected '5\\n'")
    assert check_code_sample(GOOD, ADD_TESTS, FAST, "length", fmt).reason == "truncated"
    assert check_code_sample(GOOD.replace("</think>", ""), ADD_TESTS, FAST, "stop", fmt).reason == "missing_think"
    assert check_code_sample("<think>x</think> no code", ADD_TESTS, FAST, "stop", fmt).reason == "no_code_block"
    v = check_code_sample("<think>x</think>\n```python\nwhile True: pass\n```", ADD_TESTS,
                          SandboxLimits(timeout_s=1), "stop", fmt)
    assert (v.verdict, v.reason) == ("rejected", "time_limit")
    assert check_code_sample(GOOD, "[]", FAST, "stop", fmt).verdict == "error"  # bad tests: not a wrong answer
    assert check_code_sample(None, ADD_TESTS, FAST, None, fmt, error="engine died").reason == "generation_error"


def test_which_rows_are_code():
    from stages.common.checkers import is_code_row

    assert is_code_row({"tests": ADD_TESTS}) and is_code_row({"tests": json.dumps(ADD_TESTS)})
    for empty in (None, "", " ", "[]", [], {}):
        assert not is_code_row({"tests": empty})
    assert not is_code_row({"answer": "7"})
    assert is_code_row({"answer": "[]"}, "code") and not is_code_row({"tests": ADD_TESTS}, "math")


def test_verify_actor_checks_code_and_math_rows_in_order(backend):
    from stages.verify import Params, VerifierActor

    p = Params.model_validate({"checker": "auto", "code": {"timeout_s": 2, "cpu_seconds": 2}})
    with pytest.raises(ValidationError):
        Params.model_validate({"code": {"timeout": 2}})
    math_row = {"completion": "<think>x</think> \\boxed{7}", "finish_reason": "stop", "answer": "7", "error": None}
    rows = [
        {**math_row, "tests": None},
        {"completion": GOOD, "finish_reason": "stop", "answer": "", "error": None, "tests": json.dumps(ADD_TESTS)},
        {"completion": BAD, "finish_reason": "stop", "answer": "", "error": None, "tests": ADD_TESTS},
        {**math_row, "answer": "8", "tests": None},
        {"completion": GOOD, "finish_reason": "stop", "answer": "", "error": None, "tests": json.dumps(ADD_TESTS)},
    ]
    actor = VerifierActor(workers=2, timeout=5.0)
    try:
        out = actor.check(rows, p.format.model_dump(), p.checker, p.code.model_dump())
        assert [(v["verdict"], v["reason"]) for v in out] == [
            ("correct", "ok"), ("correct", "ok"), ("rejected", "wrong_output"), ("rejected", "wrong_answer"),
            ("correct", "ok")]
        assert actor.stats()["code_checks"] == 3 and len(actor.code_cache) == 2  # the repeated program ran once
        # checker=code: tests from the answer column (prompts read with answer_field: tests)
        code_rows = [{"completion": GOOD, "finish_reason": "stop", "answer": json.dumps(ADD_TESTS), "error": None}]
        assert actor.check(code_rows, p.format.model_dump(), "code", p.code.model_dump())[0]["reason"] == "ok"
        # math-only chunks take the old path untouched
        assert actor.check([math_row], p.format.model_dump())[0]["reason"] == "ok"
    finally:
        actor.pool.close()


def test_many_files_are_bounded_in_total(backend):
    """Each file is capped by RLIMIT_FSIZE and the work folder is a tmpfs of about
    ``max_file_mb``, so many small files cannot fill the host's disk or memory either."""
    src = prog("""
        chunk = b"x" * (1 << 20)
        for i in range(200):  # 200 files of 4 MB = 800 MB
            with open(f"f{i}", "wb") as f:
                for _ in range(4):
                    f.write(chunk)
    """)
    r = one(src, limits=SandboxLimits(timeout_s=10, max_file_mb=10))
    assert (r["verdict"], r["reason"]) == ("fail", "file_size_limit"), r
    assert "No space left on device" in r["detail"]


# --------------------------------------------------------------------------- function-call tests

ADD_CHECK = {"test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
             "entry_point": "add"}


def call(program: str, tests=ADD_CHECK, kind=None, limits: SandboxLimits = FAST) -> dict:
    return run_tests(prog(program), tests, limits, kind)


def test_parse_test_suite_shapes():
    kind, t = sb.parse_test_suite(ADD_CHECK)
    assert kind == "function_call" and t.entry_point == "add" and "def check" in t.code
    kind, t = sb.parse_test_suite(json.dumps({"test_list": ["assert f(1) == 2"], "test_setup_code": "import math",
                                              "test_imports": ["import os"]}))
    assert kind == "function_call" and t.code == "assert f(1) == 2" and t.setup == "import os\nimport math"
    assert sb.parse_test_suite(["assert f(1) == 2", "assert f(2) == 3"])[1].code == "assert f(1) == 2\nassert f(2) == 3"
    assert sb.parse_test_suite("assert f(1) == 2", "function_call")[1].code == "assert f(1) == 2"
    assert sb.parse_test_suite({"kind": "call", "code": "assert f()"})[0] == "function_call"
    assert sb.parse_test_suite(ADD_TESTS) == ("stdio", ADD_TESTS)
    assert sb.parse_test_suite(ADD_TESTS, "stdin")[0] == "stdio"
    for tests, kind, msg in [
        (ADD_TESTS, "function_call", "not Python test code"),
        (ADD_CHECK, "stdio", "are function-call tests"),
        (ADD_CHECK, "fortran", "unknown test kind"),
        ({"test": "", "entry_point": "f"}, None, "need their Python code"),
        ({"test": "assert 1", "entry_point": "1f"}, None, "entry_point must be a function name"),
        ({"test_list": []}, None, "non-empty list"),
        ("assert f(1) == 2", None, "not JSON"),
    ]:
        with pytest.raises(ValueError, match=msg):
            sb.parse_test_suite(tests, kind)


def test_function_call_verdicts(backend):
    r = call("def add(a, b):\n    return a + b")
    assert (r["verdict"], r["reason"], r["kind"], r["tests"], r["passed"]) == ("pass", "ok", "function_call", 1, 1)
    r = call("def add(a, b):\n    return a - b")
    assert (r["verdict"], r["reason"]) == ("fail", "wrong_output")
    assert r["detail"] == "failed: assert candidate(1, 2) == 3"  # the failing assertion
    r = call("def add(a, b):\n    raise KeyError('k')")
    assert (r["reason"], r["detail"]) == ("runtime_error", "KeyError: 'k', while running: assert candidate(1, 2) == 3")
    r = call("def add(a, b):\n    assert a > 5, 'too small'\n    return a + b")  # the program's own assert
    assert r["reason"] == "runtime_error" and "AssertionError: too small in the program" in r["detail"]
    r = call("import nosuchmodule\ndef add(a, b):\n    return a + b")
    assert r["reason"] == "runtime_error" and "ModuleNotFoundError" in r["detail"]
    r = call("def plus(a, b):\n    return a + b")
    assert (r["reason"], r["detail"]) == ("runtime_error", "the program defines no add")
    # the wall clock well under the CPU limit, so it is the wall clock that stops the loop on a fast machine too
    r = call("def add(a, b):\n    while True:\n        pass", limits=SandboxLimits(timeout_s=1, cpu_seconds=10))
    assert (r["verdict"], r["reason"]) == ("timeout", "time_limit")
    r = call("def add(a, b):\n    return bytearray(1 << 34)")
    assert r["reason"] == "memory_limit"
    # a demo under `if __name__ == "__main__":` does not run (it would wait for input)
    assert call("def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    add(int(input()), 1)")["reason"] == "ok"
    # MBPP-style asserts with setup code, run in the program's namespace
    mbpp = {"test_list": ["assert add(1, 2) == 3", "assert math.isclose(add(0.1, 0.2), 0.3)"],
            "test_setup_code": "import math"}
    assert call("def add(a, b):\n    return a + b", mbpp)["reason"] == "ok"
    r = call("def add(a, b):\n    return round(a + b)", mbpp)
    assert (r["reason"], r["detail"]) == ("wrong_output", "failed: assert math.isclose(add(0.1, 0.2), 0.3)")
    assert call("def add(a, b):\n    return a + b", ADD_TESTS, "function_call")["reason"] == "bad_tests"


def test_a_program_cannot_fake_a_pass(backend):
    """Passing needs the run's token, which the harness read from stdin before the program ran."""
    for src in [
        "import os\nos._exit(0)",  # ends the process before the tests run
        "import sys\nsys.exit(0)",
        "import os, sys\ntok = sys.stdin.readline().strip() or os.read(0, 100).decode().strip()\n"
        "os.write(1, ('\\n' + tok + ' PASS \"\"\\n').encode())\nos._exit(0)",
        "import os\nprint('0' * 32 + ' PASS \"\"')\nos._exit(0)",
    ]:
        r = call(src)
        assert (r["verdict"], r["reason"]) == ("fail", "runtime_error"), (src, r)


def test_call_based_cases(backend):
    """APPS ``fn_name`` cases and LiveCodeBench functional cases, a plain function or a Solution method."""
    apps = {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]}
    assert call("def add(a, b):\n    return a + b", apps)["reason"] == "ok"
    r = call("def add(a, b):\n    return a + b if a < 3 else 0", apps)
    assert (r["reason"], r["detail"]) == ("wrong_output", "failed: assert _distill_eq(_distill_fn('add')(*[3, 4]), [7])")
    lcb = {"fn_name": "twoSum", "tests": [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"},
                                          {"input": "[3, 3]\n6", "output": "[0, 1]", "testtype": "functional"}]}
    solution = """
        class Solution:
            def twoSum(self, nums, target):
                seen = {}
                for i, x in enumerate(nums):
                    if target - x in seen:
                        return (seen[target - x], i)  # a tuple matches a JSON list
                    seen[x] = i
    """
    assert call(solution, json.dumps(lcb))["reason"] == "ok"
    assert call(solution.replace("(seen[target - x], i)", "(i, seen[target - x])"), lcb)["reason"] == "wrong_output"
    with pytest.raises(ValueError, match="not JSON"):
        sb.parse_test_suite({"fn_name": "f", "tests": [{"input": "[1,", "output": "1"}]})
    with pytest.raises(ValueError, match="same length"):
        sb.parse_test_suite({"fn_name": "f", "inputs": [[1]], "outputs": []})
