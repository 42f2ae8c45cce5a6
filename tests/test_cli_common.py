"""What every `distill` command shares (pipeline/cli/common.py): the storage root is resolved one
way (--root, else the config's storage.root, else $DISTILL_ROOT, else .distill), and a config
error is printed one way, with any secret of this environment redacted."""
import json

from report_fake_run import fake_demo_run
from typer.testing import CliRunner

from pipeline.cli.main import app

SECRET = "sk-cli-common-7f3a9c2e1b5d4f60"
TOY = "  toy_task: {params: {seed: 0, train_size: 4, distill_size: 2, eval_size: 2}}\n"


def _ok(args: list[str]) -> str:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (args, r.output)
    return r.output


def test_every_command_resolves_the_same_root(tmp_path, monkeypatch):
    root = tmp_path / "env-root"
    st, run_id = fake_demo_run(root)
    monkeypatch.setenv("DISTILL_ROOT", str(root))
    monkeypatch.chdir(tmp_path)  # no .distill here: a command that ignored $DISTILL_ROOT finds nothing
    cfg = tmp_path / "no-root.yaml"  # no storage section: the config's root is the default too
    cfg.write_text("name: p\nstages:\n" + TOY)

    from pipeline.cli.common import load, root_of

    assert load(str(cfg)).storage.root == root_of() == root_of(config=str(cfg)) == str(root)
    assert root_of(root="elsewhere", config=str(cfg)) == "elsewhere"  # --root wins
    for args in (["runs", "ls", "--json"], ["runs", "ls", "--config", str(cfg), "--json"]):
        assert [r["run_id"] for r in json.loads(_ok(args))] == [run_id], args
    assert json.loads(_ok(["runs", "show", "--json"]))["run_id"] == run_id
    # one run resolver: runs show takes what the report takes, a run manifest's URI or folder too
    from pipeline.store import layout

    for ref in (st.uri(layout.run_manifest(st, run_id)), st.uri(layout.run_dir(st, run_id))):
        assert json.loads(_ok(["runs", "show", ref, "--json"]))["run_id"] == run_id
    listed = json.loads(_ok(["datasets", "ls", "--json"]))
    assert listed and all(d["uri"].startswith(str(root)) for d in listed)
    swept = json.loads(_ok(["datasets", "gc", "--dry-run", "--older-than-hours", "0", "--json"]))["files"]
    assert swept and all(f["path"].startswith(str(root)) for f in swept)  # gc looked at that root
    assert f"report: {tmp_path / 'report'}" in _ok(["report", "--out", str(tmp_path / "report")])
    assert "toy_task" in _ok(["plan", str(cfg)])
    _ok(["schedule", "add", "nightly", "--cron", "0 3 * * *", "--config", str(cfg)])  # to the config's root
    assert [s["name"] for s in json.loads(_ok(["schedule", "ls", "--json"]))] == ["nightly"]
    assert st.exists(st.path("schedules")) and not (tmp_path / ".distill").exists()


def test_every_command_that_reads_a_config_prints_its_errors_one_way_and_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cfg = tmp_path / "bad.yaml"  # the bad value is the secret itself: the error would echo it
    cfg.write_text(f"name: bad\nstorage: {{root: {tmp_path / 'root'}}}\nray: {{num_cpus: {SECRET}}}\nstages:\n" + TOY)
    commands = [["plan", str(cfg)], ["run", str(cfg)], ["runs", "ls", "--config", str(cfg)],
                ["runs", "show", "--config", str(cfg)], ["report", "--config", str(cfg)],
                ["submit", str(cfg), "--address", "http://127.0.0.1:9"], ["jobs", "ls", "--config", str(cfg)],
                ["schedule", "add", "n", "--cron", "0 3 * * *", "--config", str(cfg)]]
    for args in commands:
        r = CliRunner().invoke(app, args)
        lines = [line for line in r.output.splitlines() if "ray.num_cpus" in line]
        assert r.exit_code == 2 and lines, (args, r.output)
        assert all(line.startswith("config error ") and "***" in line for line in lines), (args, r.output)
        assert SECRET not in r.output, args
