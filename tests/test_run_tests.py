"""tools/run_tests.py, which `make test` runs: the suite split into shards of about equal time,
files sharing a costly session fixture kept in one shard, and a crash inside one shard handled as
in a single run (that shard runs again from the crashed test; the run passes only if it then does)."""
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import run_tests  # noqa: E402


def _files(tmp_path, texts: dict[str, str]) -> list[str]:
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    return [str(tmp_path / n) for n in texts]


def test_shards_balance_time_and_keep_a_fixture_group_together(tmp_path):
    files = _files(tmp_path, {
        "test_a.py": "def test(): pass\n", "test_b.py": "def test(): pass\n", "test_c.py": "def test(): pass\n",
        "test_s1.py": "def test(solver_model): pass\n", "test_s2.py": "def test(solver_eval_rows): pass\n",
    })
    weights = {"test_a.py": 100, "test_b.py": 60, "test_c.py": 45, "test_s1.py": 30, "test_s2.py": 20}
    shards = run_tests.shard(files, 2, weights)
    names = [{f.rsplit("/", 1)[1] for f in s} for s in shards]
    # longest first to the lighter shard: a (100) | b (60); solver group (50) -> b; c (45) -> a
    assert sorted(names, key=len) == [{"test_a.py", "test_c.py"}, {"test_b.py", "test_s1.py", "test_s2.py"}]
    assert sorted(f for s in shards for f in s) == sorted(files)  # every file once
    assert run_tests.shard(files, 1, weights) == [sorted(files)]


def test_weigh_sums_each_files_phases(tmp_path):
    log = tmp_path / "durations.log"
    log.write_text("12.50s call     tests/test_x.py::test_one[a]\n0.50s setup    tests/test_x.py::test_one[a]\n"
                   "3.00s teardown tests/test_y.py::test_two\n(12 durations < 0.005s hidden)\n"
                   "[shard 1] 2.00s call     tests/test_z.py::test_three\n[alone] 1.00s setup    tests/test_x.py::t\n"
                   "[shard 1] [ 50%] 9.00s call tests/test_w.py::not_a_duration_line\n")
    assert run_tests.weigh(str(log)) == {"test_x.py": 14.0, "test_y.py": 3.0, "test_z.py": 2.0}


def test_a_crash_in_one_shard_reruns_that_shard_from_the_crashed_test(tmp_path):
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")  # the crash log it writes
    marker = tmp_path / "crashed-once"
    _files(tmp_path, {
        "test_one.py": ("import os, signal\n"
                        "def test_before(): pass\n"
                        f"def test_crash():\n    if not os.path.exists({str(marker)!r}):\n"
                        f"        open({str(marker)!r}, 'w').close()\n        os.kill(os.getpid(), signal.SIGSEGV)\n"
                        "def test_after(): pass\n"),
        "test_two.py": "def test_other(): pass\n",
    })
    run = subprocess.run([sys.executable, str(REPO / "tools" / "run_tests.py"), "--shards", "2", "-q",
                          "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)  # hang guard
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    crashed = next(line.split("]")[0] + "]" for line in out.splitlines() if "pytest died of signal 11" in line)
    assert f"{crashed} pytest died of signal 11 in test_one.py::test_crash" in out
    assert f"{crashed} running the 2 tests from test_one.py::test_crash on again, once" in out
    assert out.count("exit code 0") == 2 and "2 passed" in out and "1 passed" in out
    assert "temporary folders are kept" not in out

    (tmp_path / "test_two.py").write_text("def test_other(): assert False\n")
    marker.unlink()
    run = subprocess.run([sys.executable, str(REPO / "tools" / "run_tests.py"), "--shards", "2", "-q",
                          "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1, run.stdout  # the other shard's failure fails the run
    kept = run.stdout.split("temporary folders are kept in ")[1].split()[0]
    assert Path(kept).is_dir()  # left for a look
    shutil.rmtree(kept)


def test_files_marked_alone_run_after_the_shards_with_none_beside_them(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    shard_test = "import time\ndef test(): time.sleep(1); open({!r}, 'w').close()\n"
    _files(tmp_path, {
        "test_a.py": shard_test.format(str(done / "a")),
        "test_b.py": shard_test.format(str(done / "b")),
        "test_solo.py": ("import os, pytest\npytestmark = pytest.mark.alone\n"
                         f"def test(): assert sorted(os.listdir({str(done)!r})) == ['a', 'b']\n"),
    })
    assert run_tests.alone(str(tmp_path / "test_solo.py")) and not run_tests.alone(str(tmp_path / "test_a.py"))
    run = subprocess.run([sys.executable, str(REPO / "tools" / "run_tests.py"), "--shards", "2", "-q",
                          "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)  # hang guard
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    shards = [line for line in out.splitlines() if line.startswith("[shard ") and " files, weighing " in line]
    assert len(shards) == 2 and not any("test_solo.py" in line for line in shards)  # in no shard
    assert out.index("[alone] 1 files") > max(out.index("[shard 0] exit code 0"), out.index("[shard 1] exit code 0"))
    assert "[alone] exit code 0" in out

    (tmp_path / "done" / "a").unlink()
    (tmp_path / "test_a.py").write_text("def test(): assert False\n")
    run = subprocess.run([sys.executable, str(REPO / "tools" / "run_tests.py"), "--shards", "2", "-q",
                          "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1 and "[alone]" not in run.stdout, run.stdout  # a failed shard stops the run
    shutil.rmtree(run.stdout.split("temporary folders are kept in ")[1].split()[0])
