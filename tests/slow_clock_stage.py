"""``slow_clock``: a test-only stage for the scheduler tests (``uses: slow_clock_stage:SlowClock``,
with ``tests/`` on PYTHONPATH). It reads the clock as its external source, so it is never
cached, sleeps ``seconds`` (a job longer than the cron interval), and writes one row saying when
it ran."""
from __future__ import annotations

import time
from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from pipeline.core.stage import Stage, StageContext

SCHEMA = pa.schema([("run_id", pa.string()), ("started", pa.float64()), ("finished", pa.float64())])


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = 3.0


class SlowClock(Stage):
    kind: ClassVar[str] = "slow_clock"
    Params = Params
    outputs: ClassVar[dict] = {"ticks": "dataset"}
    output_columns: ClassVar[dict] = {"ticks": SCHEMA}

    def external_fingerprint(self) -> dict:
        return {"clock": time.time()}  # a new version on every run

    def run(self, ctx: StageContext) -> None:
        started = time.time()
        time.sleep(self.params.seconds)
        ctx.write_dataset("ticks", [pa.Table.from_pylist(
            [{"run_id": ctx.run_id, "started": started, "finished": time.time()}], schema=SCHEMA)])
