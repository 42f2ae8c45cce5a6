"""toy_task: a small multi-step arithmetic task the project makes itself.

Each problem chains 2-4 additions/subtractions of small numbers. The gold
solution works one step per line inside ``<think>`` and ends in ``\\boxed{}``,
so the same verifiers and formats as real math data apply. Three disjoint
splits come out, drawn in this order from one seeded stream: ``eval`` (held
out), ``train`` (with gold solutions, to build a toy teacher) and ``distill``
(prompts the teacher answers), so a larger distill split changes neither of
the first two.
Disjointness is by prompt text, hence by ``prompt_id``.
"""
from __future__ import annotations

import json
import random
from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.ids import prompt_id
from pipeline.core.stage import Stage, StageContext

PROMPT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("source", pa.string()),
        ("metadata", pa.string()),
        ("solution", pa.string()),
    ]
)


def make_problem(rng: random.Random, min_steps: int, max_steps: int, max_operand: int,
                 easy_fraction: float = 0.0, slip_rate: float = 0.0) -> tuple[str, str, str]:
    """Returns (prompt, solution, answer).

    With probability ``easy_fraction`` a problem uses single-digit operands only
    (easy for a small model); otherwise operands go up to ``max_operand``. The
    mix gives a teacher whose pass rate varies by problem, as real data does.
    Values never go negative.

    With probability ``slip_rate`` a step of the written solution is off by one
    (an arithmetic slip, carried into the later steps and the boxed answer);
    ``answer`` stays the true value. A model trained to convergence on such
    solutions slips at about that rate per step, so its pass rate is set by
    the data rather than by where its training stopped. ``slip_rate=0`` draws
    exactly the problems it drew before the option existed.
    """
    top = 9 if rng.random() < easy_fraction else max_operand
    steps = rng.randint(min_steps, max_steps)
    value = rng.randint(1, top)
    terms = [str(value)]
    lines = []
    written = value  # what the solution carries: the true value unless a step slipped
    for _ in range(steps):
        b = rng.randint(1, top)
        op = "-" if b <= min(value, written) and rng.random() < 0.4 else "+"
        delta = -b if op == "-" else b
        shown = written + delta
        if slip_rate and rng.random() < slip_rate:
            shown = shown + 1 if shown == 0 or rng.random() < 0.5 else shown - 1
        lines.append(f"{written} {op} {b} = {shown}")
        terms.append(f"{op} {b}")
        value, written = value + delta, shown
    prompt = f"Compute {' '.join(terms)}."
    solution = "<think>\n" + "\n".join(lines) + "\n</think>\nThe answer is \\boxed{" + str(written) + "}."
    return prompt, solution, str(value)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    train_size: int = Field(4000, ge=1)
    distill_size: int = Field(200, ge=1)
    eval_size: int = Field(100, ge=1)
    min_steps: int = Field(2, ge=1)
    max_steps: int = Field(3, ge=1)
    max_operand: int = Field(50, ge=2)
    easy_fraction: float = Field(0.5, ge=0, le=1)
    slip_rate: float = Field(0.0, ge=0, lt=1)


class ToyTask(Stage):
    kind: ClassVar[str] = "toy_task"
    version: ClassVar[str] = "2"  # 2: splits drawn eval, train, distill
    Params = Params
    inputs: ClassVar[dict] = {}
    outputs: ClassVar[dict] = {"train": "dataset", "distill": "dataset", "eval": "dataset"}
    output_columns: ClassVar[dict] = {"train": PROMPT_SCHEMA, "distill": PROMPT_SCHEMA, "eval": PROMPT_SCHEMA}

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        rng = random.Random(p.seed)
        seen: set[str] = set()
        # train before distill: the teacher's training draw does not depend on how many distill
        # prompts a config asks for (a larger distill split used to eat the easy problems first)
        splits = {"eval": p.eval_size, "train": p.train_size, "distill": p.distill_size}
        attempts_left = 50 * sum(splits.values())
        for split, size in splits.items():
            rows = []
            while len(rows) < size:
                attempts_left -= 1
                if attempts_left < 0:
                    raise RuntimeError(
                        f"toy_task: could not draw {size} distinct problems for split {split!r}; "
                        "raise max_operand or max_steps"
                    )
                prompt, solution, answer = make_problem(rng, p.min_steps, p.max_steps, p.max_operand, p.easy_fraction,
                                                       p.slip_rate)
                if prompt in seen:
                    continue
                seen.add(prompt)
                rows.append(
                    {
                        "prompt_id": prompt_id(prompt),
                        "prompt": prompt,
                        "answer": answer,
                        "source": f"toy_task/{split}",
                        "metadata": json.dumps({"steps": solution.count("\n") - 2}),
                        "solution": solution,
                    }
                )
            ctx.write_dataset(split, [pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)])
