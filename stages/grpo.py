"""grpo: TRL's ``GRPOTrainer`` on Ray Train, rewarded by the pipeline's own verifier.

Inputs: ``data`` (prompts with gold answers: ``prompt``, ``answer``; ``prompt_id`` when
present) and the starting model (``params.model`` or an input ``model``), usually the SFT
student. Output ``model``, committed as ``sft`` commits its model, with the same workers,
checkpoints, resume, progress and stage record (``stages.common.training``).

The reward is ``verify``'s verdict on each completion: the same format gate (``format``), the
same math-verify comparison in the verifier's worker processes with the same hard per-check
deadline (``timeout_s``), so a pathological answer costs at most the deadline, is ``rejected``
with reason ``timeout`` (reward 0) and the step goes on. math-verify's own ``signal.alarm``
timeout works only in a main thread, which is why TRL's reward functions usually run it
without one; here it never runs in the trainer's thread. Reward 1 for ``correct``, 0 for
anything else; an ``error`` verdict (a checker crash) is reward 0 and counted. Code rows (a
``tests`` column, or ``checker: code``) run their last fenced code block against the tests in
the sandbox (limits in ``code``), as ``verify`` runs them. With
``format_reward`` > 0, a completion that passes the format gate earns that much even when its
answer is wrong. A completion cut at ``max_completion_length`` has finish reason ``length``
(``format.reject_truncated`` then rejects it).

Per logging step the record's ``curves`` hold TRL's ``reward`` (the mean),
``completions/mean_length`` and ``completions/clipped_ratio`` (the truncation rate), and
``verify/<reason>``: the share of each verification reason among that step's completions.
Those means are over different prompts at each step, so their noise hides a small gain. The
record's ``reward_by_visit`` follows the same prompts instead: for each prompt (its
``prompt_id``, or its text), the mean reward of its group on its 1st, 2nd, ... visit (epoch),
and per visit the gain over the 1st visit, paired over the prompts seen on both, with its SE.
It counts rank 0's completions from the step its worker group started at (``from_step``).

``num_generations``, ``beta``, ``loss_type``, ``max_completion_length``, ``temperature`` and
``scale_rewards`` go to TRL as they are. Completions come from the trainer's own generation;
on GPUs ``vllm_mode`` (``colocate`` or ``server``) hands them to vLLM as TRL provides.
"""
from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from pipeline.core.stage import KEYED_WHEN_SET, NOT_OUTPUT, StageContext, StageError
from stages.common.checkers import FORMAT_PASSED_REASONS, FormatSpec
from stages.common.sandbox import CodeSpec
from stages.common.train_recipe import recipe_start, trl_args, without_printer
from stages.common.training import TrainingStage, TrainParams, run_training


class Params(TrainParams):
    model_config = ConfigDict(extra="forbid")
    num_generations: int = Field(8, ge=2, description="completions per prompt (the group)")
    max_completion_length: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.0, ge=0, description="KL coefficient (0: no reference model)")
    loss_type: str = "dapo"
    scale_rewards: str | bool = "group"
    format: FormatSpec = Field(default_factory=FormatSpec)
    checker: str = Field("auto", pattern="^(auto|math|code)$",
                         description="as verify's: auto: rows with a `tests` field are code, the rest math")
    code: CodeSpec = Field(default_factory=CodeSpec, description="sandbox limits for code rows")
    code_workers: int = Field(2, ge=1, json_schema_extra=NOT_OUTPUT, description="sandbox runs at a time")
    format_reward: float = Field(0.0, ge=0, description="reward for a well-formed completion, even a wrong one")
    timeout_s: float = Field(5.0, gt=0, description="hard wall-clock limit per answer check")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, json_schema_extra=KEYED_WHEN_SET)
    vllm_mode: Literal["none", "colocate", "server"] = Field("none", json_schema_extra=NOT_OUTPUT,
                                                             description="GPUs only: TRL's vLLM generation")
    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler: str = "constant"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(16, ge=2, description="completions per optimizer step, all workers: a multiple of "
                                                  "num_generations")
    # model, epochs, max_steps, grad_accum, seed, bf16: TrainParams; where and how it runs: TrainResources


class RewardByVisit:
    """Each prompt's group reward per visit, and per visit the paired gain over the first one."""

    def __init__(self):
        self.seen: dict[str, int] = {}  # prompt key -> visits so far
        self.means: dict[int, dict[str, float]] = {}  # visit (1-based) -> prompt key -> its group's mean reward

    def add(self, keys: list[str], rewards: list[float]) -> None:
        groups: dict[str, list[float]] = {}
        for k, r in zip(keys, rewards):
            groups.setdefault(k, []).append(r)
        for k, rs in groups.items():  # one call scores one visit of a prompt: its group's completions
            visit = self.seen.get(k, 0) + 1
            self.seen[k] = visit
            self.means.setdefault(visit, {})[k] = sum(rs) / len(rs)

    def summary(self) -> list[dict]:
        import math

        first = self.means.get(1, {})
        out = []
        for visit in sorted(self.means):
            now = self.means[visit]
            row = {"visit": visit, "prompts": len(now), "mean_reward": round(sum(now.values()) / len(now), 4)}
            diffs = [now[k] - first[k] for k in now if k in first]
            if visit > 1 and diffs:
                d = sum(diffs) / len(diffs)
                sd = math.sqrt(sum((x - d) ** 2 for x in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else 0.0
                row.update({"paired_prompts": len(diffs), "gain_vs_first": round(d, 4),
                            "gain_se": round(sd / math.sqrt(len(diffs)), 4)})
            out.append(row)
        return out


class VerifierReward:
    """A TRL reward function: ``verify``'s verdict per completion. Math rows are checked in the
    verifier's worker processes (``stages.common.verifier.VerifierPool``), code rows (a ``tests``
    column, or ``checker: code``) run against their tests in the sandbox, as ``verify`` runs
    them; each reason's share is logged."""

    __name__ = "verify"

    def __init__(self, fmt: FormatSpec, timeout_s: float, max_completion_length: int, format_reward: float = 0.0,
                 checker: str = "auto", code: CodeSpec | None = None, code_workers: int = 2):
        self.fmt, self.timeout_s = fmt, timeout_s
        self.max_completion_length, self.format_reward = max_completion_length, format_reward
        self.checker, self.code, self.code_workers = checker, code or CodeSpec(), code_workers
        self.code_cache: dict = {}
        self._pool = None
        self.by_visit = RewardByVisit()

    def pool(self):
        if self._pool is None:
            from stages.common.verifier import VerifierPool

            self._pool = VerifierPool(workers=1, timeout=self.timeout_s)
        return self._pool

    def verdicts(self, completions: list, answers: list, completion_ids: list | None = None,
                 tests: list | None = None, test_kind: list | None = None) -> list[dict]:
        from stages.common.verifier import check_mixed_rows

        rows = []
        for i, (c, a) in enumerate(zip(completions, answers)):
            text = c[-1]["content"] if isinstance(c, list) else c
            n = len(completion_ids[i]) if completion_ids is not None else 0
            row = {"completion": text, "answer": a,
                   "finish_reason": "length" if n >= self.max_completion_length else "stop"}
            if tests is not None:
                row["tests"] = tests[i]
            if test_kind is not None:
                row["test_kind"] = test_kind[i]
            rows.append(row)
        return check_mixed_rows(self.pool(), rows, self.fmt, self.checker, self.code, self.code_workers,
                                self.code_cache)

    def __call__(self, prompts, completions, completion_ids=None, answer=None, log_metric=None, tests=None,
                 test_kind=None, prompt_id=None, **kw) -> list[float]:
        verdicts = self.verdicts(completions, answer, completion_ids, tests, test_kind)
        if log_metric is not None:
            reasons: dict[str, int] = {}
            for v in verdicts:
                reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
            for reason, n in reasons.items():
                log_metric(f"verify/{reason}", n / len(verdicts))
        rewards = [1.0 if v["verdict"] == "correct" else
                   (self.format_reward if self.format_reward and v["reason"] in FORMAT_PASSED_REASONS else 0.0)
                   for v in verdicts]
        keys = [str(k) for k in prompt_id] if prompt_id is not None else [repr(p) for p in prompts]
        self.by_visit.add(keys, rewards)
        return rewards



def grpo_config(p: Params, output_dir: str):
    import torch
    from trl import GRPOConfig

    gpu = p.num_gpus > 0 and torch.cuda.is_available()
    return GRPOConfig(
        **trl_args(p, output_dir),  # its use_cpu is the same as not gpu
        num_generations=p.num_generations, max_completion_length=p.max_completion_length,
        temperature=p.temperature, beta=p.beta, loss_type=p.loss_type, scale_rewards=p.scale_rewards,
        use_vllm=gpu and p.vllm_mode != "none", vllm_mode=p.vllm_mode if p.vllm_mode != "none" else "colocate",
        chat_template_kwargs=dict(p.chat_template_kwargs) or None,
    )


def worker_trainer(model_dir: str, files: list[str], params: dict, work: str):
    """The recipe ``stages.common.training.train_loop`` calls on each worker."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer

    p, tok, cache = recipe_start(Params, model_dir, params, work)
    import pyarrow.parquet as pq

    names = set(pq.read_schema(files[0]).names)
    columns = ["prompt", "answer"] + [c for c in ("tests", "test_kind", "prompt_id") if c in names]
    data = Dataset.from_parquet(files, columns=columns, cache_dir=cache)
    data = data.map(lambda b: {"prompt": [[{"role": "user", "content": q}] for q in b["prompt"]]}, batched=True,
                    cache_file_name=os.path.join(cache, "prompts-chat.arrow"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    reward = VerifierReward(p.format, p.timeout_s, p.max_completion_length, p.format_reward, p.checker, p.code,
                            p.code_workers)
    trainer = without_printer(GRPOTrainer(model=model, reward_funcs=[reward], args=grpo_config(p, work),
                                          train_dataset=data, processing_class=tok))
    trainer.add_callback(_by_visit_callback(trainer, reward))
    return trainer


def _by_visit_callback(trainer, reward: VerifierReward):
    """Puts ``reward_by_visit`` (and the step it was counted from) into the trainer's stage metrics."""
    from transformers import TrainerCallback

    class ByVisit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.from_step = state.global_step  # after a resume: the checkpoint's step

        def on_train_end(self, args, state, control, **kw):
            trainer.stage_metrics = {"reward_by_visit": reward.by_visit.summary(),
                                     "reward_by_visit_from_step": self.from_step}

    return ByVisit()


class GRPO(TrainingStage):
    kind: ClassVar[str] = "grpo"
    Params = Params
    requires: ClassVar[tuple] = ("torch", "transformers", "trl", "ray.train", "math_verify")
    input_columns: ClassVar[dict] = {"data": {"prompt": "string", "answer": "string"}}

    def more_problems(self) -> list[tuple[str, str]]:
        p: Params = self.params
        if p.batch_size % p.num_generations:
            return [("batch_size", (f"{p.batch_size} completions per step is not a whole number of groups of "
                                    f"num_generations {p.num_generations}"))]
        return []

    def run(self, ctx: StageContext) -> None:
        if not ctx.input_rows("data"):
            raise StageError("no prompts to train on")
        run_training(ctx, self.params, "stages.grpo:worker_trainer")
