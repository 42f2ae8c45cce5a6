"""The read side of runs, one for every command: find a run's manifest (a run id, ``latest``, or
a URI), list the runs under a root, and read the manifests of every artifact a run names.
``distill runs ls``, ``runs show`` and the report all go through here; a missing or corrupt
manifest is a :class:`ReadError` naming the file.
"""
from __future__ import annotations

from pipeline.store import layout
from pipeline.store.layout import default_root
from pipeline.store.storage import DATASET_FORMAT, MANIFEST, MODEL_FORMAT, Storage, StorageError


class ReadError(RuntimeError):
    """A run cannot be read: its manifest, or one it references, is missing or corrupt."""


def _read_json(st: Storage, path: str, what: str) -> dict:
    uri = st.uri(path)
    try:
        data = st.read_json(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise ReadError(f"{uri}: missing ({what})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ReadError(f"{uri}: corrupt {what}, not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ReadError(f"{uri}: corrupt {what}, not a JSON object")
    return data


def load_run(run: str, root: str | Storage | None = None) -> tuple[Storage, dict, str]:
    """(storage root, run manifest, manifest URI) for a run id, ``latest``, or the URI of a
    run manifest (``.../runs/<id>/manifest.json``) or of its folder."""
    looks_like_uri = "://" in run or run.endswith(".json") or "/" in run
    if looks_like_uri:
        st0 = Storage(run)
        path = st0.root
        if not path.endswith(".json"):
            path = f"{path.rstrip('/')}/{layout.RUN_MANIFEST}"
        m = _read_json(st0, path, "run manifest")
        parts = path.rstrip("/").split("/")
        if len(parts) >= 3 and parts[-3] == layout.RUNS:
            base = "/".join(parts[:-3]) or "/"
            st = Storage(st0.uri(base))
        else:  # a manifest copied elsewhere: the root it names (without credentials)
            st = Storage(m.get("storage_root") or st0.uri(path.rsplit("/", 1)[0]))
        return st, _check_run(m, st0.uri(path)), st0.uri(path)
    st = root if isinstance(root, Storage) else Storage(root or default_root())
    run_id = run
    if run == "latest":
        try:
            with st.fs.open(layout.latest_run(st), "rb") as f:
                run_id = f.read().decode().strip()
        except FileNotFoundError as e:
            raise ReadError(f"no runs under {st.uri(layout.runs_root(st))} "
                              f"(missing {st.uri(layout.latest_run(st))})") from e
    path = layout.run_manifest(st, run_id)
    return st, _check_run(_read_json(st, path, "run manifest"), st.uri(path)), st.uri(path)


def _check_run(m: dict, uri: str) -> dict:
    for key in ("run_id", "stages"):
        if key not in m:
            raise ReadError(f"{uri}: corrupt run manifest, no {key!r}")
    if not isinstance(m["stages"], list) or not all(isinstance(s, dict) and "name" in s for s in m["stages"]):
        raise ReadError(f"{uri}: corrupt run manifest, 'stages' is not a list of stage entries")
    return m


class RunArtifacts:
    """A run manifest and the manifests of every artifact its stages name."""

    def __init__(self, st: Storage, manifest: dict, uri: str):
        self.st, self.m, self.uri = st, manifest, uri
        self.stages = {s["name"]: s for s in manifest["stages"]}
        self.order = [s["name"] for s in manifest["stages"]]
        self.artifacts: dict[str, dict] = {}  # "stage.output" -> {uri, type, manifest, storage, path}
        for s in manifest["stages"]:
            for out, uri in (s.get("output") or {}).items():
                ast, path = st.locate(uri)
                man = _read_json(ast, f"{path.rstrip('/')}/{MANIFEST}", f"manifest of {s['name']}.{out}")
                kind = {DATASET_FORMAT: "dataset", MODEL_FORMAT: "model"}.get(man.get("format"))
                if kind is None:
                    raise ReadError(f"{ast.uri(path.rstrip('/') + '/' + MANIFEST)}: corrupt manifest of "
                                      f"{s['name']}.{out}: unknown format {man.get('format')!r}")
                if kind == "dataset" and not isinstance(man.get("rows"), int):
                    raise ReadError(f"{ast.uri(path.rstrip('/') + '/' + MANIFEST)}: corrupt dataset manifest, "
                                      "no 'rows'")
                self.artifacts[f"{s['name']}.{out}"] = {"uri": uri, "type": kind, "manifest": man, "storage": ast,
                                                        "path": path}

    def dataset(self, ref: str) -> dict | None:
        a = self.artifacts.get(ref)
        return a if a and a["type"] == "dataset" else None

    def read(self, ref: str, columns: list[str]):
        a = self.artifacts[ref]
        schema = a["manifest"].get("schema") or {}
        cols = [c for c in columns if c in schema]
        try:
            return a["storage"].read_dataset(a["path"], columns=cols)
        except (OSError, StorageError) as e:
            raise ReadError(f"{a['uri']}: cannot read dataset {ref} ({e})") from e


def list_runs(storage: Storage) -> list[dict]:
    """Every run manifest under the root, oldest first (a folder without one is skipped)."""
    runs = []
    for p in storage.ls(layout.runs_root(storage)):
        if not layout.is_run_dir(p):
            continue
        try:
            runs.append(storage.read_json(f"{p}/{layout.RUN_MANIFEST}"))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue
    runs.sort(key=lambda m: m.get("started", ""))
    return runs
