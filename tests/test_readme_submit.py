"""README, "What is shipped" / "What runs" of ``distill submit``: ``--working-dir`` picks the
folder shipped as the job's working_dir, ``--python`` the cluster's python in the entry point,
and the package Ray builds from that runtime_env (Ray's own packaging, with ``.gitignore`` and
``.rayignore`` honoured as Ray's upload does by default) holds the config and the project's files
but none of: what ``.gitignore`` / ``.rayignore`` exclude, the always-excluded folders, files
that hold credentials, files over ``--max-file-mb``, a local storage root inside the folder.
Nothing is sent: the submission is made against a closed port and the prepared job is read."""
import zipfile

from typer.testing import CliRunner

import pipeline.cli.jobs as jobs_cli
from pipeline.cli.main import app


def test_submit_working_dir_python_and_what_is_shipped(tmp_path, monkeypatch):
    wd = tmp_path / "project"
    (wd / "ignored_by_ray").mkdir(parents=True)
    (wd / ".venv" / "lib").mkdir(parents=True)
    (wd / "src").mkdir()
    (wd / "data.jsonl").write_text('{"prompt": "Compute 1 + 1.", "answer": "2"}\n')
    (wd / "p.yaml").write_text(f"""
name: shipped
storage: {{root: {wd}/root}}
stages:
  prompts: {{params: {{path: {wd}/data.jsonl}}}}
""")
    (wd / "root").mkdir()
    (wd / "root" / "old.parquet").write_bytes(b"x" * 10)  # a local storage root inside the folder
    (wd / "src" / "helper.py").write_text("X = 1\n")
    (wd / ".gitignore").write_text("ignored_by_git.txt\n")
    (wd / ".rayignore").write_text("ignored_by_ray/\n")
    (wd / "ignored_by_git.txt").write_text("git says no\n")
    (wd / "ignored_by_ray" / "x.txt").write_text("ray says no\n")
    (wd / ".venv" / "lib" / "x.py").write_text("\n")
    (wd / ".env").write_text("A=1\n")
    (wd / "notes.txt").write_text("aws_secret_access_key = abc\n")  # a credential by its content
    (wd / "big.bin").write_bytes(b"\0" * 300_000)  # over --max-file-mb 0.25

    made = []
    real = jobs_cli.prepare

    def spy(*a, **k):  # the real prepare; the prepared job is kept for the checks below
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(jobs_cli, "prepare", spy)
    monkeypatch.chdir(tmp_path)  # not the working directory: --working-dir says which
    result = CliRunner().invoke(app, ["submit", str(wd / "p.yaml"), "--address", "http://127.0.0.1:9",
                                      "--working-dir", str(wd), "--python", "/opt/cluster/bin/python",
                                      "--max-file-mb", "0.25"])
    assert result.exit_code != 0  # nothing listens on port 9: nothing was sent
    assert len(made) == 1, (result.output, result.exception)
    (sub,) = made
    assert sub.runtime_env["working_dir"] == str(wd)
    assert sub.entrypoint.startswith("/opt/cluster/bin/python -m pipeline.cli run p.yaml --address auto --run-id ")
    assert [p for p, _ in sub.excluded_large] == ["big.bin"]

    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "package.zip"
    create_package(sub.runtime_env["working_dir"], package, include_gitignore=True,
                   excludes=sub.runtime_env["excludes"])
    with zipfile.ZipFile(package) as z:
        shipped = {n.rstrip("/") for n in z.namelist() if not n.endswith("/")}
    assert shipped == {"p.yaml", "data.jsonl", "src/helper.py", ".gitignore", ".rayignore"}, shipped
