"""Submitting pipelines to a Ray cluster through the Ray Jobs API, and operating those jobs.

``distill submit`` ships the working directory (the project and the config, without the
folders in ``EXCLUDES`` and files over ``MAX_FILE_BYTES``) as the job's ``working_dir`` and runs
``python -m pipeline.cli run CONFIG --address auto --run-id RUN`` on the cluster, which writes
its run manifest and datasets to the config's storage root. Ray forgets jobs when the cluster
goes down; those manifests are the lasting history (``distill runs ls``).

Addresses come only from ``--address`` or the config's ``ray.address``: the Ray SDK lets
``RAY_ADDRESS`` / ``RAY_API_SERVER_ADDRESS`` in the environment silently override its
argument, so both are hidden from it while the client is built.

Authentication: with ``RAY_AUTH_MODE=token`` the token comes from ``RAY_AUTH_TOKEN``, else the
file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, and is sent explicitly as
``Authorization: Bearer``. Without ``RAY_AUTH_MODE=token`` no token is sent (so a stray token
file never travels to some other server). 401 and 403 become :class:`AuthError`, which says how
to provide a token.

Secrets (cloud keys, tokens) are never put in the job: nothing goes to
``runtime_env.env_vars`` (anyone who can list jobs reads them), and the entrypoint, metadata
and runtime env are checked against the secret values of this environment before submitting.
The cluster gets its credentials on its own (instance roles, Kubernetes secrets, files on
the nodes).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.store.secrets import _read, redact, secret_values  # noqa: F401  (re-exported)

METADATA_TAG = "distill"  # metadata key that marks a job as submitted by distill
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
# Never shipped to the cluster: environments, caches, local outputs, VCS data and files
# that usually hold credentials. Gitignore-style patterns, as Ray's ``excludes`` takes them.
EXCLUDES = [
    ".venv", "venv", ".distill", ".git", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    ".cache", ".ipynb_checkpoints", "node_modules", "*.egg-info", "build", "dist", ".tox",
    ".env", ".env.*", ".aws", ".ray", "auth_token", "credentials", "*.pem", "*.key",
    ".ssh", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.ppk", ".netrc", "_netrc", ".pgpass", ".git-credentials",
    ".pypirc", ".npmrc", ".dockercfg", ".docker", ".kube", ".gnupg", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx",
    ".htpasswd", "*.gpg", "*.asc", "token", "*.token",
]
# Files left out by what they hold, whatever their name: private keys, cloud credential files,
# netrc entries, service-account keys (read: the first CONTENT_SCAN_BYTES of files up to 1 MiB).
_CREDENTIAL_SHAPES = re.compile(  # case-sensitive: the shapes of key and credential files, not docs naming them
    rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----|aws_secret_access_key\s*=\s*[^\s$<{]|aws_session_token\s*=\s*[^\s$<{]|"
    rb"\"private_key\"\s*:\s*\"-----BEGIN|^\s*machine\s+\S+\s+login\s+\S+\s+password\s|"
    rb"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])", re.M)
CONTENT_SCAN_BYTES = 1 << 20
MAX_FILE_BYTES = 10 * 2**20  # larger files are left out (Ray warns at 10 MiB a file); --max-file-mb changes it
_ADDRESS_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
_NO_AGENT_WAIT_S = 60.0  # a just-started head answers "No available agent" until its agent is up


class JobsError(Exception):
    """A failure to show the user as is (exit code ``code``)."""

    code = 1


class ConfigProblem(JobsError):
    code = 2


class AuthError(JobsError):
    pass


class DuplicateJob(JobsError):
    pass


class JobNotFound(JobsError):
    pass


# -- secrets ----------------------------------------------------------------------

def check_no_secrets(what: dict[str, Any], secrets: dict[str, str] | None = None) -> None:
    """Refuse to send ``what`` (entrypoint, metadata, runtime env) when it holds a secret value;
    the error names the secret's source and the field, never the value."""
    secrets = secret_values() if secrets is None else secrets
    for part, value in what.items():
        text = json.dumps(value, default=str)
        for name, secret in secrets.items():
            if secret in text:
                raise JobsError(f"refusing to submit: the job's {part} would contain the value of {name}. "
                                "Secrets never go into a job (anyone who can list jobs reads them); "
                                "the cluster must get its credentials itself (see README, Operations).")


# -- address and token ------------------------------------------------------------

@dataclass
class Address:
    url: str
    source: str  # "--address" or "<config>: ray.address"

    def describe(self) -> str:
        from pipeline.store.storage import redact_uri

        ignored = [f"{k}={redact_uri(os.environ[k])}" for k in _ADDRESS_ENV if os.environ.get(k)]
        note = f"; ignored {', '.join(ignored)} from the environment" if ignored else ""
        return f"Ray Jobs API {redact_uri(self.url)} (from {self.source}{note})"

    def plain_http_warning(self) -> str | None:
        """A warning when the token would cross the network unencrypted: plain http:// to a host
        that is not loopback."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        host = (parts.hostname or "").lower()
        if parts.scheme != "http" or host in ("localhost", "::1") or host.startswith("127."):
            return None
        return (f"warning: {self.source} is plain http:// to {host}, not loopback: the Ray token and the shipped "
                "code cross the network unencrypted. Use https:// (a TLS proxy in front of the dashboard) or an "
                "SSH tunnel to 127.0.0.1.")


def resolve_address(address: str | None, config: str | None = None) -> Address:
    """The Jobs API URL from ``--address``, else from the config's ``ray.address``. Never from
    the environment."""
    if address:
        value, source = address, "--address"
    elif config:
        from pipeline.core.config import ConfigError, load_config

        try:
            value = load_config(config).ray.address
        except ConfigError as e:
            raise ConfigProblem("\n".join(e.problems)) from e
        source = f"{config}: ray.address"
        if not value:
            raise ConfigProblem(f"{config}: ray.address: not set; pass --address http://HEAD:8265")
    else:
        raise ConfigProblem("no cluster address: pass --address http://HEAD:8265 (the head's dashboard / Jobs API), "
                            "or --config FILE whose ray.address is that URL. RAY_ADDRESS is not used.")
    value = value.strip().rstrip("/")
    if "://" not in value and re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d+", value):
        value = "http://" + value
    if not re.match(r"^https?://[^/\s]+$", value):
        raise ConfigProblem(f"{source}: {value!r} is not a Jobs API URL; expected http(s)://HEAD:8265 "
                            "(the dashboard port, not a ray:// or GCS address)")
    return Address(value, source)


AUTH_HELP = ("Provide the cluster's token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token>, or "
             "RAY_AUTH_TOKEN_PATH=<file holding it>, or put it in ~/.ray/auth_token. "
             "On the head, `ray get-auth-token` prints it.")


def auth_token(env: dict | None = None) -> tuple[str | None, str]:
    """(token, where it came from). None unless ``RAY_AUTH_MODE=token``."""
    env = os.environ if env is None else env
    mode = (env.get("RAY_AUTH_MODE") or "").strip().lower()
    if mode != "token":
        return None, f"RAY_AUTH_MODE={mode or '(unset)'}"
    if (env.get("RAY_AUTH_TOKEN") or "").strip():
        return env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        token = _read(path)
        if not token:
            raise AuthError(f"RAY_AUTH_TOKEN_PATH={path}: no token there (missing, unreadable or empty). {AUTH_HELP}")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    path = Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"
    token = _read(path)
    if token:
        return token, str(path)
    raise AuthError(f"RAY_AUTH_MODE=token but no token found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, {path}). {AUTH_HELP}")


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# -- the client -------------------------------------------------------------------

def submission_id_for(pipeline: str, run_id: str) -> str:
    return f"distill-{pipeline}-{run_id}"


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds") if ms else None


def job_record(info: Any) -> dict:
    """The fields of a Ray ``JobDetails`` that distill shows."""
    md = dict(info.metadata or {})
    status = getattr(info.status, "value", str(info.status))
    return {
        "submission_id": info.submission_id, "status": status, "message": info.message,
        "pipeline": md.get("pipeline"), "run_id": md.get("run_id"), "config": md.get("config"),
        "storage_root": md.get("storage_root"), "start": _iso(info.start_time), "end": _iso(info.end_time),
        "entrypoint": info.entrypoint, "metadata": md,
    }


class JobsClient:
    """``JobSubmissionClient`` with the address given (never the environment's), the token
    sent explicitly, and its errors turned into :class:`JobsError` s that say what to do."""

    def __init__(self, address: Address):
        self.address = address
        token, self.token_source = auth_token()
        self._headers = {"Authorization": f"Bearer {token}"} if token else None
        from ray.job_submission import JobSubmissionClient

        with _without_address_env():
            self.client = self._call(JobSubmissionClient, address.url, headers=self._headers)

    # every SDK call goes through here
    def _call(self, fn: Callable, *args, job: str | None = None, **kwargs):
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as e:
            raise self._auth_error(401 if "required" in str(e).lower() else 403) from None
        except (ConnectionError, requests.exceptions.ConnectionError):
            raise JobsError(f"cannot reach the Ray Jobs API at {self.address.url} (from {self.address.source}): "
                            "is the head running, and is its dashboard port reachable from here "
                            "(e.g. through an SSH tunnel)?") from None
        except RuntimeError as e:
            raise self._http_error(str(e), job) from None

    def _auth_error(self, status: int) -> AuthError:
        if status == 401:
            return AuthError(f"the Ray Jobs API at {self.address.url} requires a token (HTTP 401) and none was sent "
                             f"({self.token_source}). {AUTH_HELP}")
        return AuthError(f"the Ray Jobs API at {self.address.url} refused the token from {self.token_source} "
                         f"(HTTP 403: wrong token). {AUTH_HELP}")

    def _http_error(self, text: str, job: str | None) -> JobsError:
        m = re.search(r"status code (\d+)", text)
        status = int(m.group(1)) if m else None
        if status == 404 and job:
            return JobNotFound(f"no job {job!r} on {self.address.url}")
        if status == 400 and "already exists" in text:
            return DuplicateJob(f"a job with submission id {job!r} already exists on {self.address.url}")
        last = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and ln.strip() != "."]
        detail = last[-1] if last else text
        return JobsError(f"Ray Jobs API at {self.address.url} failed"
                         f"{f' (HTTP {status})' if status else ''}: {redact(detail)[:500]}")

    # -- operations
    def info(self, job: str) -> Any:
        return self._call(self.client.get_job_info, job, job=job)

    def find(self, job: str) -> Any | None:
        try:
            return self.info(job)
        except JobNotFound:
            return None

    def list(self, only_distill: bool = True) -> list[Any]:
        jobs = self._call(self.client.list_jobs)
        if only_distill:
            jobs = [j for j in jobs if (j.metadata or {}).get(METADATA_TAG)]
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def logs(self, job: str) -> str:
        return self._call(self.client.get_job_logs, job, job=job)

    def stop(self, job: str) -> bool:
        return self._call(self.client.stop_job, job, job=job)

    def submit(self, **kwargs) -> str:
        job = kwargs.get("submission_id")
        deadline = time.time() + _NO_AGENT_WAIT_S
        while True:
            try:
                return self._call(self.client.submit_job, job=job, **kwargs)
            except JobsError as e:
                if "No available agent" not in str(e) or time.time() > deadline:
                    raise
                time.sleep(1.0)

    def wait(self, job: str, timeout: float | None = None, on_status: Callable[[str], None] | None = None,
             poll: float = 1.0) -> str:
        """Poll until the job is terminal; returns its status."""
        deadline = None if timeout is None else time.time() + timeout
        last = None
        while True:
            status = job_record(self.info(job))["status"]
            if status != last and on_status:
                on_status(status)
            last = status
            if status in TERMINAL:
                return status
            if deadline is not None and time.time() > deadline:
                raise JobsError(f"job {job!r} still {status} after {timeout:.0f}s")
            time.sleep(poll)

    def follow(self, job: str, write: Callable[[str], None]) -> str:
        """Stream the job's logs as they come until it ends; returns its final status."""
        import aiohttp

        self.info(job)  # JobNotFound before opening the stream

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job):
                write(chunk)

        try:
            asyncio.run(tail())
        except aiohttp.WSServerHandshakeError as e:
            if e.status in (401, 403):
                raise self._auth_error(e.status) from None
            raise JobsError(f"cannot follow the logs of {job!r} at {self.address.url}: HTTP {e.status}") from None
        except (aiohttp.ClientConnectionError, RuntimeError) as e:
            raise JobsError(f"log stream of {job!r} from {self.address.url} broke: {redact(str(e))}") from None
        return self.wait(job, timeout=60)


# -- submitting -------------------------------------------------------------------

@dataclass
class Submission:
    submission_id: str
    run_id: str
    pipeline: str
    address: Address
    config: str
    storage_root: str
    entrypoint: str
    runtime_env: dict
    metadata: dict
    excluded_large: list[tuple[str, int]] = field(default_factory=list)
    replaces: dict | None = None  # the existing job a --rerun follows
    excluded_credentials: list[str] = field(default_factory=list)  # left out for what they hold

    @property
    def dashboard_url(self) -> str:
        return f"{self.address.url}/#/jobs/{self.submission_id}"

    def manifest_uri(self) -> str:
        return f"{self.storage_root.rstrip('/')}/runs/{self.run_id}/manifest.json"

    def to_json(self) -> dict:
        return {"submission_id": self.submission_id, "run_id": self.run_id, "pipeline": self.pipeline,
                "address": self.address.url, "address_source": self.address.source, "config": self.config,
                "storage_root": self.storage_root, "dashboard_url": self.dashboard_url,
                "run_manifest": self.manifest_uri(), "entrypoint": self.entrypoint,
                "excluded_large_files": [p for p, _ in self.excluded_large],
                "excluded_credential_files": self.excluded_credentials, "replaces": self.replaces}


def _escape(rel: str) -> str:
    return "/" + re.sub(r"([\[\]*?!\\])", r"\\\1", rel)


def _shipped_files(root: Path):
    """Every file under ``root`` outside the always-excluded names (``EXCLUDES``)."""
    import fnmatch

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not any(fnmatch.fnmatch(d, p) for p in EXCLUDES)]
        for name in filenames:
            if not any(fnmatch.fnmatch(name, p) for p in EXCLUDES):
                yield Path(dirpath) / name


def large_files(root: Path, max_bytes: int) -> list[tuple[str, int]]:
    """Files over ``max_bytes`` under ``root``, outside the always-excluded folders."""
    out = []
    for p in _shipped_files(root):
        try:
            size = p.stat().st_size
        except OSError:
            continue
        if size > max_bytes and not p.is_symlink():
            out.append((p.relative_to(root).as_posix(), size))
    return sorted(out)


def credential_files(root: Path, secrets: dict[str, str] | None = None) -> list[str]:
    """Files under ``root`` (outside the excluded names) whose content looks like a key or a
    credential file, or holds a secret value of this environment: never shipped."""
    values = [v.encode() for v in (secret_values() if secrets is None else secrets).values()]
    out = []
    for p in _shipped_files(root):
        try:
            if p.is_symlink() or p.stat().st_size > CONTENT_SCAN_BYTES:
                continue
            data = p.read_bytes()
        except OSError:
            continue
        if _CREDENTIAL_SHAPES.search(data) or any(v in data for v in values):
            out.append(p.relative_to(root).as_posix())
    return sorted(out)


def _is_local(root: str) -> bool:
    return "://" not in root or root.startswith("file://")


def prepare(config: str, address: Address, overrides: list[str] | None = None, run_id: str | None = None,
            working_dir: str | None = None, python: str = "python", max_file_bytes: int = MAX_FILE_BYTES) -> Submission:
    """Validate the config here and build the job (nothing is sent)."""
    from pipeline.core.config import ConfigError, load_config
    from pipeline.core.ids import new_run_id
    from pipeline.store.storage import redact_uri

    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        raise ConfigProblem("\n".join(e.problems)) from e
    root = cfg.storage.root
    if _is_local(root) and not Path(root.removeprefix("file://")).is_absolute():
        raise ConfigProblem(
            f"{config}: storage.root: {root!r} is a relative local path; on the cluster it would land in the job's "
            "temporary working_dir and vanish with it. Use s3://... or an absolute path that every node shares "
            "(e.g. --set storage.root=/shared/distill).")
    wd = Path(working_dir or os.getcwd()).resolve()
    if not wd.is_dir():
        raise ConfigProblem(f"--working-dir {wd}: not a folder")
    try:
        rel_config = Path(config).resolve().relative_to(wd).as_posix()
    except ValueError:
        raise ConfigProblem(f"{config}: outside the working directory {wd}, which is what is shipped to the cluster; "
                            "run from a folder that holds the config (or pass --working-dir)") from None
    if run_id is not None and not ID_RE.match(run_id):
        raise ConfigProblem(f"--run-id {run_id!r}: use letters, digits, '_', '.', '-' (at most 200)")
    run_id = run_id or new_run_id(cfg.name)

    excludes = list(EXCLUDES)
    if _is_local(root):
        try:
            excludes.append(_escape(Path(root.removeprefix("file://")).resolve().relative_to(wd).as_posix()))
        except ValueError:
            pass
    big = large_files(wd, max_file_bytes)
    excludes += [_escape(p) for p, _ in big]
    held_back = credential_files(wd)
    if rel_config in held_back:
        raise ConfigProblem(f"{config}: holds a key, a credential or a secret value of this environment; it would be "
                            "shipped to the cluster. Keep secrets out of the config (the cluster gets its own).")
    excludes += [_escape(p) for p in held_back]
    argv = [python, "-m", "pipeline.cli", "run", rel_config, "--address", "auto", "--run-id", run_id]
    for item in overrides or []:
        argv += ["--set", item]
    metadata = {METADATA_TAG: "1", "pipeline": cfg.name, "run_id": run_id, "config": rel_config,
                "storage_root": redact_uri(root)}
    sub = Submission(submission_id_for(cfg.name, run_id), run_id, cfg.name, address, rel_config, redact_uri(root),
                     shlex.join(argv), {"working_dir": str(wd), "excludes": excludes}, metadata, big,
                     excluded_credentials=held_back)
    check_no_secrets({"entrypoint": sub.entrypoint, "metadata": sub.metadata, "runtime_env": sub.runtime_env})
    return sub


def _manifest_exists(storage_root: str, run_id: str) -> bool:
    """Whether storage already holds this run's manifest (a job of a cluster since gone);
    best effort: this machine may not be able to read the cluster's storage."""
    try:
        from pipeline.store import layout
        from pipeline.store.storage import Storage

        st = Storage(storage_root)
        return st.exists(layout.run_manifest(st, run_id))
    except Exception:  # no credentials or no route from here: Ray's own record still counts
        return False


def submit(client: JobsClient, sub: Submission, rerun: bool = False) -> Submission:
    """Submit ``sub``. A job or run manifest with its id already existing is refused unless
    ``rerun``, which submits it again as ``<run_id>-r2`` (then -r3, ...)."""
    def taken(s: Submission) -> dict | None:
        info = client.find(s.submission_id)
        if info is not None:
            return job_record(info)
        if _manifest_exists(s.storage_root, s.run_id):
            return {"submission_id": s.submission_id, "status": "DONE (run manifest in storage)",
                    "run_manifest": s.manifest_uri()}
        return None

    existing = taken(sub)
    if existing is not None:
        if not rerun:
            raise DuplicateJob(
                f"job {existing['submission_id']} already exists ({existing['status']}) on {client.address.url}; "
                f"its run manifest is {sub.manifest_uri()}. Pass --rerun to run it again as a new job, "
                "or choose another --run-id.")
        base_run = sub.run_id
        for k in range(2, 1000):
            candidate = _with_run_id(sub, f"{base_run}-r{k}")
            if taken(candidate) is None:
                candidate.replaces = existing
                sub = candidate
                break
        else:  # pragma: no cover
            raise DuplicateJob(f"too many reruns of {sub.submission_id}")
    try:
        client.submit(entrypoint=sub.entrypoint, submission_id=sub.submission_id, runtime_env=sub.runtime_env,
                      metadata=sub.metadata)
    except DuplicateJob:  # another submit won the race between our check and the request
        info = client.find(sub.submission_id)
        status = job_record(info)["status"] if info is not None else "unknown"
        raise DuplicateJob(f"job {sub.submission_id} already exists ({status}) on {client.address.url}; "
                           "pass --rerun to run it again as a new job, or choose another --run-id.") from None
    return sub


def _with_run_id(sub: Submission, run_id: str) -> Submission:
    argv = shlex.split(sub.entrypoint)
    argv[argv.index("--run-id") + 1] = run_id
    return Submission(submission_id_for(sub.pipeline, run_id), run_id, sub.pipeline, sub.address, sub.config,
                      sub.storage_root, shlex.join(argv), sub.runtime_env, {**sub.metadata, "run_id": run_id},
                      sub.excluded_large, excluded_credentials=sub.excluded_credentials)
