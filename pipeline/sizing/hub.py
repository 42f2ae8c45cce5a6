"""Hugging Face Hub models, pinned to a commit.

A model param may name a hub model as ``hf://ORG/NAME@REVISION`` (a branch, tag or commit
sha; no ``@`` means ``main``) or, in YAML, as a mapping ``{repo: ORG/NAME, revision: REV}``
(``normalize_params`` turns it into the string form before a stage's params are validated).

References are resolved through ``huggingface_hub`` and its cache: ``HF_HOME`` (or
``HF_HUB_CACHE``) says where the cache is, ``HF_HUB_OFFLINE=1`` forbids any network call,
and the token comes from huggingface_hub's standard locations (``HF_TOKEN``, the token file);
distill never reads, logs or records it, and every error message goes through ``redact``.
Both variables are read when a reference is resolved, not when the library was imported.

Resolving at plan time fetches only ``config.json`` (the architecture, for the resource fit
and the cost estimate) and turns the revision into its commit sha. The stage's params are
then pinned to ``hf://ORG/NAME@<sha>``: the fingerprint is the sha, so a branch that moves on
the hub gives a new fingerprint (new samples) rather than silently reusing old ones, and the
engines and trainers load exactly that snapshot (``local_snapshot``, downloaded once into the
cache where they run). ``run_models`` lists what each stage's references resolved to, for the
run manifest.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEME = "hf://"
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHA = re.compile(r"[0-9a-f]{40}")
MODEL_FIELDS = ("model", "teacher", "student", "base")  # where stages take a model reference


class HubError(ValueError):
    """A hub reference that cannot be parsed or resolved; the message says what to do."""


@dataclass(frozen=True)
class Resolved:
    repo: str
    revision: str  # as asked: a branch, tag or sha
    sha: str  # the commit it resolved to
    snapshot: str  # the local snapshot folder (holding at least config.json)

    @property
    def pinned(self) -> str:
        return f"{SCHEME}{self.repo}@{self.sha}"


# (repo, sha) -> the revision that was asked for it, for the run manifest; a sha never moves,
# so this is never stale.
_asked: dict[tuple[str, str], str] = {}


def is_hub(uri: object) -> bool:
    return isinstance(uri, str) and uri.startswith(SCHEME)


def parse(uri: str) -> tuple[str, str]:
    """``hf://ORG/NAME[@REV]`` -> (repo, revision)."""
    if not is_hub(uri):
        raise HubError(f"not a hub reference (hf://ORG/NAME@REVISION): {uri!r}")
    body = uri[len(SCHEME):]
    repo, sep, rev = body.partition("@")
    if not _REPO.fullmatch(repo):
        raise HubError(f"{uri!r}: the repo must be ORG/NAME (letters, digits, '_', '.', '-')")
    if sep and (not rev or any(c.isspace() for c in rev)):
        raise HubError(f"{uri!r}: empty or blank revision after '@'")
    return repo, rev if sep else "main"


def normalize_params(params: dict) -> dict:
    """A stage's raw params with each ``{repo: ORG/NAME, revision: REV}`` model mapping
    (in a model field) turned into ``hf://ORG/NAME@REV``; other values as they are."""
    out = dict(params)
    for k, v in params.items():
        if k in MODEL_FIELDS and isinstance(v, dict) and "repo" in v and set(v) <= {"repo", "revision"}:
            rev = v.get("revision")
            out[k] = f"{SCHEME}{v['repo']}" + (f"@{rev}" if rev not in (None, "") else "")
    return out


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> str:
    """The hub cache as huggingface_hub defines it, read from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


def _redact(text: str) -> str:
    from pipeline.store.secrets import redact
    return redact(text)


def _explain(uri: str, repo: str, rev: str, err: Exception) -> HubError:
    name = type(err).__name__
    where = f"the Hugging Face cache {cache_dir()}"
    fetch = f"`hf download {repo} --revision {rev}`"
    if offline() or name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        why = "HF_HUB_OFFLINE=1 forbids downloading it" if offline() else "the hub could not be reached"
        msg = (f"model {uri}: revision {rev!r} of {repo} is not in {where} and {why}; "
               f"run {fetch} where the hub is reachable (with HF_HOME pointing at this cache), "
               f"or unset HF_HUB_OFFLINE")
    elif name == "RevisionNotFoundError":
        msg = f"model {uri}: {repo} has no revision {rev!r} (a branch, tag or commit sha)"
    elif name in ("RepositoryNotFoundError", "GatedRepoError"):
        msg = (f"model {uri}: repository {repo} not found or not accessible with the token in "
               f"huggingface_hub's standard locations (HF_TOKEN or `hf auth login`)")
    else:
        msg = f"model {uri}: cannot resolve {repo}@{rev}: {name}: {err}"
    return HubError(_redact(msg))


def resolve(uri: str) -> Resolved:
    """The commit and the local snapshot (with ``config.json``) of a hub reference.
    Fetches ``config.json`` only; raises ``HubError`` with what to run when it cannot."""
    repo, rev = parse(uri)
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo, "config.json", revision=rev, cache_dir=cache_dir(),
                               local_files_only=offline())
    except Exception as e:  # noqa: BLE001 - huggingface_hub's errors are classified by name
        raise _explain(uri, repo, rev, e) from None
    snap = Path(path).parent
    sha = snap.name
    if not _SHA.fullmatch(sha):  # pragma: no cover - huggingface_hub's layout changed
        raise HubError(f"model {uri}: unexpected cache layout {snap}")
    _asked.setdefault((repo, sha), rev)
    return Resolved(repo, rev, sha, str(snap))


def pin(uri: str) -> str:
    """``uri`` with its revision replaced by the commit sha it resolves to now."""
    return resolve(uri).pinned


def config(uri: str) -> dict:
    with open(Path(resolve(uri).snapshot) / "config.json") as f:
        return json.load(f)


def fingerprint(uri: str) -> str:
    """The identity of a hub model: its repo and commit sha."""
    r = resolve(uri)
    return f"hf:{r.repo}@{r.sha}"


def local_snapshot(uri: str) -> str:
    """A local folder with every file of the model at its (pinned) revision: the cache's
    snapshot, downloaded once where the hub is reachable."""
    repo, rev = parse(uri)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, revision=rev, cache_dir=cache_dir(), local_files_only=offline())
    except Exception as e:  # noqa: BLE001
        raise _explain(uri, repo, rev, e) from None


def describe(uri: str) -> dict:
    """What a (pinned) reference in a stage's params stands for, for the run manifest."""
    repo, rev = parse(uri)
    out = {"uri": uri, "repo": repo, "revision": _asked.get((repo, rev), rev)}
    if _SHA.fullmatch(rev):
        out["sha"] = rev
    return out


def run_models(cfg) -> dict:
    """``{"models": {stage: {field: {uri, repo, revision, sha}}}}`` for the hub models a
    config's stages take, or ``{}`` when there are none."""
    found: dict[str, dict] = {}
    for name, node in cfg.nodes.items():
        for f in MODEL_FIELDS:
            v = getattr(node.stage.params, f, None)
            if is_hub(v):
                found.setdefault(name, {})[f] = describe(v)
    return {"models": found} if found else {}


def as_dict(r: Resolved) -> dict:
    return asdict(r)
