"""The storage layout: every path under a storage root is made here, and only here.

The runner writes through these functions, ``gc`` finds what is live through them and
inspection reads through them, so a changed layout changes all three at once::

    cache/<kind>/<fingerprint>/_stage.json            the stage record, written last (exclusive create)
    cache/<kind>/<fingerprint>/<attempt>/<output>/    one output of one attempt (dataset or model)
    cache/<kind>/<key>/checkpoints/<part>/            row-level partial results (e.g. generation chunks),
                                                      shared by every attempt with the same checkpoint key
    runs/<run_id>/manifest.json                       run manifests
    runs/_latest                                      id of the newest run
    latest/<pipeline>/<stage>.<output>                pointer (JSON) to the newest committed version of an output

All functions take a :class:`~pipeline.store.storage.Storage` and return storage paths (no
protocol); ``Storage.uri`` turns one into a URI.
"""
from __future__ import annotations

import os

from pipeline.store.storage import MANIFEST, STAGE_RECORD, Storage

ROOT_ENV = "DISTILL_ROOT"
DEFAULT_ROOT = ".distill"


def default_root() -> str:
    """The storage root where neither ``--root`` nor a config's ``storage.root`` names one:
    ``$DISTILL_ROOT``, else ``.distill``. Every command, and a config without a root, use this."""
    return os.environ.get(ROOT_ENV) or DEFAULT_ROOT


CACHE = "cache"
RUNS = "runs"
LATEST = "latest"
CHECKPOINTS = "checkpoints"
LATEST_RUN = "_latest"
RUN_MANIFEST = "manifest.json"


# -- cache: stages, attempts, outputs, checkpoints ---------------------------------------------

def cache_root(st: Storage) -> str:
    return st.path(CACHE)


def stage_dir(st: Storage, kind: str, fingerprint: str) -> str:
    return st.path(CACHE, kind, fingerprint)


def stage_record(st: Storage, kind: str, fingerprint: str) -> str:
    """The record that makes a stage count as done."""
    return st.path(CACHE, kind, fingerprint, STAGE_RECORD)


def attempt_dir(st: Storage, kind: str, fingerprint: str, attempt: str) -> str:
    return st.path(CACHE, kind, fingerprint, attempt)


def output_path(st: Storage, kind: str, fingerprint: str, attempt: str, output: str) -> str:
    return st.path(CACHE, kind, fingerprint, attempt, output)


def checkpoint_root(st: Storage, kind: str, key: str) -> str:
    return st.path(CACHE, kind, key, CHECKPOINTS)


def stage_record_glob(st: Storage) -> str:
    """A glob matching every stage record."""
    return st.path(CACHE, "*", "*", STAGE_RECORD)


def checkpoint_manifest_glob(st: Storage) -> str:
    """A glob matching the manifest of every committed checkpoint dataset."""
    return st.path(CACHE, "*", "*", CHECKPOINTS, "*", MANIFEST)


TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a training run's checkpoints


def train_run_glob(st: Storage) -> str:
    """A glob matching the snapshot of every training run (Ray Train) under a checkpoint root:
    ``cache/<kind>/<key>/checkpoints/<run>/checkpoint_manager_snapshot.json``."""
    return st.path(CACHE, "*", "*", CHECKPOINTS, "*", TRAIN_SNAPSHOT)


def train_run_of(snapshot: str) -> tuple[str, str]:
    """For a snapshot path :func:`train_run_glob` matched: (the training run's folder, the stage
    record at ``cache/<kind>/<key>/`` whose presence says its training finished)."""
    run = snapshot.rsplit("/", 1)[0]
    return run, f"{run.rsplit('/', 2)[0]}/{STAGE_RECORD}"


def record_for_output(path: str) -> str:
    """The stage record beside an output path ``.../<fingerprint>/<attempt>/<output>``, on any
    root (used for datasets whose Storage root is the dataset itself)."""
    return f"{path.rstrip('/').rsplit('/', 2)[0]}/{STAGE_RECORD}"


# -- runs and latest pointers ------------------------------------------------------------------

def runs_root(st: Storage) -> str:
    return st.path(RUNS)


def run_dir(st: Storage, run_id: str) -> str:
    return st.path(RUNS, run_id)


def run_manifest(st: Storage, run_id: str) -> str:
    return st.path(RUNS, run_id, RUN_MANIFEST)


def latest_run(st: Storage) -> str:
    """The file holding the id of the newest run."""
    return st.path(RUNS, LATEST_RUN)


def is_run_dir(path: str) -> bool:
    return not path.rstrip("/").rsplit("/", 1)[-1].startswith("_")


def latest_pointer(st: Storage, pipeline: str, stage: str, output: str) -> str:
    return st.path(LATEST, pipeline, f"{stage}.{output}")


# -- promotion -----------------------------------------------------------------------------------
#
#     best/<name>.json          the promoted ("best") student of a pipeline (JSON; conditional writes only)
#     best/<name>.history/<time>-<run>.json   every promotion decision, append-only

BEST = "best"


def best_pointer(st: Storage, name: str) -> str:
    return st.path(BEST, f"{name}.json")


def promotion_event(st: Storage, name: str, key: str) -> str:
    return st.path(BEST, f"{name}.history", f"{key}.json")


# -- leases and schedules ----------------------------------------------------------------------
#
#     leases/<schedule>                                 the run lease of a schedule (JSON; conditional writes only)
#     schedules/<name>/schedule.json                    a schedule: cron, timezone, config, address
#     schedules/<name>/history/<time>-<id>.<event>.json one history event (start, end, skip), append-only

LEASES = "leases"
SCHEDULES = "schedules"
SCHEDULE_FILE = "schedule.json"
HISTORY = "history"


def lease(st: Storage, name: str) -> str:
    return st.path(LEASES, name)


def schedules_root(st: Storage) -> str:
    return st.path(SCHEDULES)


def schedule_file(st: Storage, name: str) -> str:
    return st.path(SCHEDULES, name, SCHEDULE_FILE)


def schedule_history(st: Storage, name: str) -> str:
    """The folder of a schedule's history events."""
    return st.path(SCHEDULES, name, HISTORY)


def history_event(st: Storage, name: str, key: str, event: str) -> str:
    """One history event; ``key`` starts with a sortable UTC time so a listing is in order."""
    return st.path(SCHEDULES, name, HISTORY, f"{key}.{event}.json")
