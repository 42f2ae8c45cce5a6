"""Store checks and validated schedules.

``distill doctor`` passes on a local root and on moto S3, and fails on stores that ignore
``If-None-Match`` or ``If-Match`` (S3 file-system doubles that drop the header, named as
such). A 412 is recognised by the client's error code. A ``schedule.json`` changed by anyone
with write access to the storage is refused, with the file and the field named.
"""
from __future__ import annotations

import json

import pytest
import s3fs
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.ops.doctor import StoreUnsafe, check_store, require_safe_store
from pipeline.store.storage import Storage


class IgnoresIfNoneMatchS3Double(s3fs.S3FileSystem):
    """A test double of an S3-compatible store that accepts ``If-None-Match: *`` and ignores it."""

    async def _pipe_file(self, path, data, mode="overwrite", **kwargs):
        return await super()._pipe_file(path, data, mode="overwrite", **kwargs)


class IgnoresIfMatchS3Double(s3fs.S3FileSystem):
    """A test double of an S3-compatible store that accepts ``If-Match`` and ignores it."""

    async def _pipe_file(self, path, data, mode="overwrite", **kwargs):
        kwargs.pop("IfMatch", None)
        return await super()._pipe_file(path, data, mode=mode, **kwargs)


def _s3_root(tmp_path) -> str:
    return f"s3://distill-test/doctor-{tmp_path.name}"


def test_doctor_passes_on_a_local_root_and_on_moto(tmp_path, moto_s3_bucket):
    for root in (str(tmp_path / "root"), _s3_root(tmp_path)):
        r = CliRunner().invoke(app, ["doctor", root, "--json"])
        assert r.exit_code == 0, r.output
        report = json.loads(r.output)
        assert report["ok"] and len(report["checks"]) == 5 and all(c["ok"] for c in report["checks"])
    assert not any(p.name != "_doctor" for p in (tmp_path / "root").iterdir())  # only the emptied scratch folder


@pytest.mark.parametrize("double,ignored", [(IgnoresIfNoneMatchS3Double, "If-None-Match"),
                                            (IgnoresIfMatchS3Double, "If-Match")])
def test_doctor_fails_on_a_store_that_ignores_a_condition(tmp_path, moto_s3_bucket, double, ignored):
    st = Storage(_s3_root(tmp_path))
    st.fs = double(**st.fs.storage_options, skip_instance_cache=True)
    bad = [c for c in check_store(st) if not c.ok]
    assert [c.detail for c in bad] == [f"the store {'overwrote an existing key' if ignored == 'If-None-Match' else 'replaced a key whose version had changed'}: it ignores {ignored}"]
    with pytest.raises(StoreUnsafe, match=f"ignores {ignored}"):
        require_safe_store(st)


def test_a_412_is_known_by_its_error_code_not_its_text():
    from botocore.exceptions import ClientError

    from pipeline.store.storage import s3_error_code

    refused = ClientError({"Error": {"Code": "PreconditionFailed", "Message": "At least one of the pre-conditions"},
                           "ResponseMetadata": {"HTTPStatusCode": 412}}, "PutObject")
    wrapped = OSError("something went wrong")
    wrapped.__cause__ = refused
    assert s3_error_code(wrapped) == ("PreconditionFailed", 412)
    looks_like = OSError("object key 'runs/412/x' not found")  # '412' in the text, no 412 at all
    assert s3_error_code(looks_like) == (None, None)


def test_schedule_json_is_validated_on_load(tmp_path, caplog):
    from pipeline.ops.schedule import Schedule, ScheduleError, add_schedule, get_schedule, list_schedules
    from pipeline.store import layout

    st = Storage(str(tmp_path / "root"))
    add_schedule(st, Schedule("good", "0 3 * * *", "c.yaml"))
    add_schedule(st, Schedule("bad", "0 3 * * *", "c.yaml"))
    path = layout.schedule_file(st, "bad")
    base = st.read_json(path)
    cases = {
        "address": ({**base, "address": "ray://evil.example:10001"}, "address:"),
        "cron": ({**base, "cron": "not a cron"}, "cron 'not a cron'"),
        "name": ({**base, "name": "good"}, "name: 'good' is not the schedule's folder name 'bad'"),
        "unknown": ({**base, "env": {"X": "1"}}, "unknown field(s) env"),
        "type": ({**base, "lease_ttl_s": "300"}, "lease_ttl_s: '300' is not a"),
    }
    for what, (doc, message) in cases.items():
        st.write_json(path, doc)
        with pytest.raises(ScheduleError) as e:
            get_schedule(st, "bad")
        assert message in str(e.value) and "schedules/bad/schedule.json" in str(e.value), (what, str(e.value))
        with caplog.at_level("ERROR", logger="distill.schedule"):
            assert [s.name for s in list_schedules(st)] == ["good"]  # not run, and said so
        assert "schedule bad is not run" in caplog.text
    with pytest.raises(ScheduleError, match="schedule name"):
        get_schedule(st, "../etc")


def test_schedules_store_the_config_relative_to_the_working_dir(tmp_path, monkeypatch):
    """`schedule add` stores the config relative to the working directory; a machine without
    that directory (a CronJob pod whose image holds the tree elsewhere) runs from its own."""
    from pipeline.ops.schedule import get_schedule, run_dir

    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    root = tmp_path / "root"
    (proj / "configs" / "c.yaml").write_text(
        f"name: rel\nstorage: {{root: {root}}}\nstages:\n  toy_task: {{params: {{seed: 0, train_size: 4}}}}\n")
    monkeypatch.chdir(proj)
    r = CliRunner().invoke(app, ["schedule", "add", "n", "--cron", "0 3 * * *", "--config", "configs/c.yaml",
                                 "--max-run", "3600"])
    assert r.exit_code == 0, r.output
    sched = get_schedule(Storage(str(root)), "n")
    assert (sched.config, sched.workdir, sched.max_run_s) == ("configs/c.yaml", str(proj), 3600)
    assert run_dir(sched) == str(proj)
    pod = tmp_path / "app"  # the same tree under another path; the stored workdir is not there
    (pod / "configs").mkdir(parents=True)
    (pod / "configs" / "c.yaml").write_text((proj / "configs" / "c.yaml").read_text())
    sched.workdir = str(tmp_path / "gone")
    monkeypatch.chdir(pod)
    assert run_dir(sched) == str(pod)
    monkeypatch.chdir(tmp_path)
    assert run_dir(sched) is None  # neither there nor here: the job is not started blind
