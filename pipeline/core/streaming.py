"""The streaming data plane: stages work on pieces of their inputs on the cluster's workers.

A committed dataset is a list of Parquet shards, each written in row groups of bounded size
(``storage.ROW_GROUP_BYTES``). A **piece** is a run of consecutive row groups of one shard,
about ``target_bytes`` of compressed data: what one Ray task or actor call reads, processes
and writes back. The driver plans pieces from manifests and Parquet footers (metadata only),
sends them out with a bounded number in flight, and collects what the workers report: the
output shards they wrote (``{path, rows, bytes, sha256}``) and small counters. It never holds
rows. When every piece is done it commits each output's manifest (``StageContext.commit_shards``)
from the reported shards, in piece order, so the dataset's row order is the input's.

The commit protocol is the one of ``pipeline.store.storage``: a worker writes uniquely named shards
under the output's folder (``piece-<index>-NNNNN-<token>.parquet``); a piece retried after a
worker or node died writes new names, and only the shards of the attempt that reported back
are listed in the manifest. A killed run commits no manifest, so readers see nothing.

A stage body in the streaming form::

    specs = {"kept": ctx.output_spec("kept")}
    for piece, result in ordered(ctx.input_pieces("data"), lambda pc: work.remote(pc, specs), 4):
        shards.extend(result["kept"])            # metadata only
    ctx.commit_shards("kept", shards)

with ``work`` a Ray task that reads ``read_piece(storage, piece)``, writes through
``specs["kept"].writer(piece)`` and returns ``{"kept": writer.finish()}``.
"""
from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import conform
from pipeline.store.storage import DatasetWriter, Storage

DEFAULT_PIECE_BYTES = 32 * 2**20  # compressed bytes of input per piece


def piece_bytes() -> int:
    """The piece size: ``DISTILL_PIECE_BYTES`` (e.g. tiny, to test many pieces), else the default."""
    return int(os.environ.get("DISTILL_PIECE_BYTES") or DEFAULT_PIECE_BYTES)

T = TypeVar("T")


@dataclass(frozen=True)
class Piece:
    """Consecutive row groups of one shard: the unit of work of a streaming stage."""

    index: int  # position among the dataset's pieces
    path: str  # the shard's storage path (no protocol)
    row_groups: tuple[int, ...]
    offset: int  # dataset row number of the piece's first row
    rows: int


def plan_pieces(storage: Storage, path: str, target_bytes: int | None = None,
                max_rows: int | None = None) -> list[Piece]:
    """The pieces of the committed dataset at ``path``, in row order. Reads the manifest and each
    shard's Parquet footer, never the rows."""
    manifest = storage.dataset_manifest(path)
    target_bytes = target_bytes or piece_bytes()
    pieces: list[Piece] = []
    offset = 0
    for shard in manifest["shards"]:
        spath = f"{path.rstrip('/')}/{shard['path']}"
        if not shard["rows"]:
            continue
        with storage.fs.open(spath, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        groups: list[int] = []
        rows = size = 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            if groups and (size + rg.total_byte_size > target_bytes or (max_rows and rows + rg.num_rows > max_rows)):
                pieces.append(Piece(len(pieces), spath, tuple(groups), offset, rows))
                offset += rows
                groups, rows, size = [], 0, 0
            groups.append(g)
            rows += rg.num_rows
            size += rg.total_byte_size
        if groups:
            pieces.append(Piece(len(pieces), spath, tuple(groups), offset, rows))
            offset += rows
    return pieces


def read_piece(storage: Storage, piece: Piece, columns: list[str] | None = None) -> pa.Table:
    """A piece's rows (only ``columns`` when given)."""
    with storage.fs.open(piece.path, "rb") as f:
        return pq.ParquetFile(f).read_row_groups(list(piece.row_groups), columns=columns)


def iter_piece(storage: Storage, piece: Piece, columns: list[str] | None = None,
               batch_rows: int = 4096) -> Iterator[pa.Table]:
    """A piece's rows, ``batch_rows`` at a time (one row group in memory at once)."""
    with storage.fs.open(piece.path, "rb") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=list(piece.row_groups), columns=columns):
            yield pa.Table.from_batches([batch])


@dataclass
class ShardSpec:
    """Where and how a worker writes its shards of one output (picklable: it travels with tasks).
    ``schema`` is the declared schema rows are conformed to, when the stage declares one."""

    storage: Storage
    path: str
    stage: str
    output: str
    schema: pa.Schema | None = None

    def writer(self, piece: Piece | int, rows_per_shard: int = 50_000) -> "PieceWriter":
        index = piece.index if isinstance(piece, Piece) else int(piece)
        return PieceWriter(self, index, rows_per_shard)


class PieceWriter:
    """A worker's writer for one piece's share of an output; ``finish()`` returns its shards."""

    def __init__(self, spec: ShardSpec, index: int, rows_per_shard: int):
        self.spec = spec
        self._w = DatasetWriter(spec.storage, spec.path, {}, rows_per_shard, prefix=f"piece-{index:06d}")
        if spec.schema is not None:
            self._w.schema = spec.schema
        self.rows = 0

    def write(self, table: pa.Table) -> None:

        schema = self.spec.schema
        if schema is not None and table.schema != schema:
            table = conform(table, schema, self.spec.stage, self.spec.output)
        self.rows += table.num_rows
        self._w.write(table)

    def finish(self) -> list[dict]:
        return self._w.finish()


def ordered(items: Iterable[T], submit: Callable[[T], Any], max_in_flight: int) -> Iterator[tuple[T, Any]]:
    """``submit(item)`` (an ObjectRef) for each item with at most ``max_in_flight`` outstanding;
    yields ``(item, result)`` in the order of ``items``. Only results, never rows, reach here."""
    import ray

    window: collections.deque = collections.deque()
    it = iter(items)
    done = False
    while True:
        while not done and len(window) < max_in_flight:
            try:
                item = next(it)
            except StopIteration:
                done = True
                break
            window.append((item, submit(item)))
        if not window:
            return
        item, ref = window.popleft()
        yield item, ray.get(ref)


class ActorRing:
    """Calls spread over a fixed set of actors, each with at most ``per_actor`` calls in flight;
    results in submission order. A call whose actor died is retried by Ray (``max_task_retries``)."""

    def __init__(self, actors: list, per_actor: int = 2):
        self.actors = actors
        self.per_actor = per_actor
        self._next = 0

    def map(self, items: Iterable[T], call: Callable[[Any, T], Any]) -> Iterator[tuple[T, Any]]:
        def submit(item: T):
            actor = self.actors[self._next % len(self.actors)]
            self._next += 1
            return call(actor, item)

        return ordered(items, submit, self.per_actor * len(self.actors))


def _map_piece(fn: Callable, piece: Piece, specs: dict, columns: list[str] | None) -> dict:
    """One piece through ``fn``: its outputs written here, shard lists and counts sent back."""
    writers = {out: spec.writer(piece) for out, spec in specs.items()}
    dropped: dict[str, dict[str, int]] = {}
    rows = 0
    for table in iter_piece(next(iter(specs.values())).storage, piece, columns):
        outs, drops = fn(table)
        rows += table.num_rows
        for out, t in outs.items():
            writers[out].write(t)
        for kind, by_reason in (drops or {}).items():
            for reason, n in by_reason.items():
                if n:
                    dropped.setdefault(kind, {})[reason] = dropped.setdefault(kind, {}).get(reason, 0) + int(n)
    return {"shards": {out: w.finish() for out, w in writers.items()}, "dropped": dropped, "rows": rows,
            "node": node_id()}


def ship_by_value(obj: Callable | type) -> None:
    """A stage module outside the project's packages (``uses: my_module:MyStage`` from a folder on
    the driver's path) may not be importable on the workers: the code of ``obj``'s module (a
    function's or a class's) travels with what is sent to them."""
    import sys

    from ray import cloudpickle

    name = getattr(obj, "__module__", None) or ""
    mod = sys.modules.get(name)
    if mod is not None and name.split(".")[0] not in ("pipeline", "stages") and name != "__main__":
        cloudpickle.register_pickle_by_value(mod)


def map_pieces(ctx, input: str, fn: Callable, outputs: dict[str, pa.Schema], columns: list[str] | None = None,
               num_cpus: float = 1) -> int:
    """The common streaming stage body: ``fn(table) -> ({output: table}, {kind: {reason: n}})`` runs
    on each piece of dataset input ``input`` in Ray tasks across the cluster (batches of a piece in
    turn), its tables written where it runs and its drop counts added to ``ctx``; then every output
    is committed, in input order, with ``input_rows`` in its stats. Returns the input's row count."""
    import ray

    specs = {out: ctx.output_spec(out, schema) for out, schema in outputs.items()}
    ship_by_value(fn)
    task = ray.remote(num_cpus=num_cpus, max_retries=3, scheduling_strategy="SPREAD")(_map_piece)
    shards: dict[str, list] = {out: [] for out in outputs}
    nodes: dict[str, int] = {}
    rows = 0
    fn_ref = ray.put(fn)
    for _, res in ordered(ctx.input_pieces(input), lambda pc: task.remote(fn_ref, pc, specs, columns), parallelism()):
        for out, lst in res["shards"].items():
            shards[out].extend(lst)
        for kind, by_reason in res["dropped"].items():
            ctx.drop_counts(kind, by_reason)
        rows += res["rows"]
        nodes[res["node"]] = nodes.get(res["node"], 0) + res["rows"]
    for out, schema in outputs.items():
        ctx.commit_shards(out, shards[out], schema, stats={"input_rows": rows})
    ctx.metrics["rows_per_node"] = nodes
    return rows


def parallelism(per_cpu: float = 1.0, cap: int = 64) -> int:
    """How many pieces to keep in flight: the cluster's CPUs (times ``per_cpu``), at least 2."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 2) if ray.is_initialized() else 2
    return max(2, min(cap, int(cpus * per_cpu)))


def node_id() -> str:
    """The Ray node this code runs on (workers report it, so a run shows where its work went)."""
    import ray

    return ray.get_runtime_context().get_node_id()
