"""tools/setup_venv.py, which `make setup` runs: uv gets every source pip would use (config files and
PIP_* variables), with pip's best-match rule, so both resolve to the same versions."""
import json
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import setup_venv  # noqa: E402


def test_every_pip_source_is_passed_to_uv():
    args, env = setup_venv.uv_arguments({
        "index-url": "https://mirror.example/simple",
        "extra-index-url": "file:///opt/a/simple file:///opt/b/simple",
        "find-links": "/opt/wheels",
        "constraint": "/etc/pip/constraints.txt",
        "cert": "/etc/ssl/ca.crt",
        "default-timeout": "180",
    })
    assert "--compile-bytecode" in args  # pip writes .pyc files at install; without them each process recompiles
    args = [a for a in args if a != "--compile-bytecode"]
    pairs = list(zip(args[::2], args[1::2]))
    assert ("--index-strategy", "unsafe-best-match") in pairs
    assert ("--index-url", "https://mirror.example/simple") in pairs
    assert ("--extra-index-url", "file:///opt/a/simple") in pairs
    assert ("--extra-index-url", "file:///opt/b/simple") in pairs
    assert ("--find-links", "/opt/wheels") in pairs
    assert ("--constraint", "/etc/pip/constraints.txt") in pairs
    assert env == {"SSL_CERT_FILE": "/etc/ssl/ca.crt", "UV_HTTP_TIMEOUT": "180"}


def test_no_settings_give_only_pips_strategy_and_its_bytecode():
    assert setup_venv.uv_arguments({}) == (["--index-strategy", "unsafe-best-match", "--compile-bytecode"], {})


def test_pip_settings_read_files_and_environment(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url = file:///from/file/simple\nfind-links = /from/file\n")
    code = "import json, setup_venv; print(json.dumps(setup_venv.pip_settings()))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO / "tools",
        env={"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": str(conf), "PIP_FIND_LINKS": "/from/env"},
    ).stdout
    settings = json.loads(out)
    assert settings["extra-index-url"] == "file:///from/file/simple"
    assert settings["find-links"] == "/from/env"  # the variable overrides the file, as in pip
