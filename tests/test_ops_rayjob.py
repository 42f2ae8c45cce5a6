"""Ray-job mode: a schedule's Ray job dies with its holder's lease.

Against a real token-auth Ray head on 127.0.0.1 (tests/ray_head.py): a schedule with
``--address`` runs `distill submit --wait --stop-on-exit` under the supervisor; the holder is
SIGKILLed while its Ray job runs. The job ends STOPPED, the next holder runs exactly one job,
and at most one job of the schedule is ever RUNNING, sampled every second. Deadlines are hang
guards, not timings.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time

from conftest import REPO
from ray_head import BIN, client_env

from pipeline.ops.schedule import read_history, runs_of
from pipeline.store.storage import Storage

TTL = 8.0
HANG_GUARD_S = 240


def _config(path, root, seconds: float) -> None:
    path.write_text(f"""
name: rayjob-nightly
storage: {{root: {root}}}
stages:
  clock: {{uses: "slow_clock_stage:SlowClock", params: {{seconds: {seconds}}}}}
""")


def test_a_killed_holders_ray_job_is_stopped_and_never_overlaps(ray_jobs_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    head = ray_jobs_head
    proj, home, root = tmp_path / "proj", tmp_path / "home", tmp_path / "root"
    proj.mkdir()
    home.mkdir()
    shutil.copy(REPO / "tests" / "slow_clock_stage.py", proj)  # shipped with the working dir
    _config(proj / "slow.yaml", root, seconds=600)
    env = client_env(head, home)

    def cli(*args, **kw):
        return subprocess.Popen([str(BIN / "python"), "-m", "pipeline.cli", *args], env=env, cwd=proj,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    add = cli("schedule", "add", "rj", "--cron", "0 3 * * *", "--config", "slow.yaml", "--address", head.url,
              "--lease-ttl", str(TTL), "--root", str(root))
    assert add.wait(120) == 0, add.stderr.read()

    client = JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"})
    samples: list[dict[str, str]] = []
    done = threading.Event()

    def ours() -> dict[str, str]:
        return {j.submission_id: j.status.value for j in client.list_jobs()
                if (j.metadata or {}).get("pipeline") == "rayjob-nightly"}

    def sample() -> None:  # every second: which of the schedule's jobs run
        while not done.wait(1.0):
            try:
                samples.append(ours())
            except Exception:
                continue

    threading.Thread(target=sample, daemon=True).start()
    holder = cli("schedule", "run-now", "rj", "--root", str(root), start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while "RUNNING" not in ours().values():
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline, "hang guard: the Ray job never reached RUNNING"
            time.sleep(0.5)
        (first,) = [k for k, v in ours().items() if v == "RUNNING"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    deadline = time.monotonic() + HANG_GUARD_S
    while client.get_job_status(first).value not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline, "hang guard: the dead holder's Ray job never ended"
        time.sleep(0.5)
    assert client.get_job_status(first).value == "STOPPED"

    _config(proj / "slow.yaml", root, seconds=0.5)
    deadline = time.monotonic() + HANG_GUARD_S
    while True:  # the next holder: skipped while the dead one's lease lives, then one run
        second = cli("schedule", "run-now", "rj", "--root", str(root), "--json")
        out, err = second.communicate(timeout=HANG_GUARD_S)
        event = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]
        if event["event"] == "end":
            break
        assert event["reason"] == "lease_held" and time.monotonic() < deadline, (event, err)
        time.sleep(1)
    done.set()
    assert event["status"] == "done", (event, err)
    jobs = ours()
    assert len(jobs) == 2 and jobs[first] == "STOPPED" and sorted(jobs.values()) == ["STOPPED", "SUCCEEDED"], jobs
    assert samples and max(list(s.values()).count("RUNNING") for s in samples) == 1, samples
    runs = runs_of(read_history(Storage(str(root)), "rj"))
    assert [r["status"] for r in runs] == ["abandoned", "done"], runs
