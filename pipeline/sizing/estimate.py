"""``distill plan --estimate``: GPU-hours (and money) per stage before anything runs.

Stages are costed by what their params declare, not by their kind:

- **decode** (params with an ``engine`` and ``sampling``: generation, evaluation). Samples =
  prompts × samples per prompt; tokens = samples × completion tokens per sample. Time comes
  from a decode roofline per replica: each engine step reads the weights and the running
  batch's KV cache from memory, ``(weight bytes + KV bytes/token × S × (P + T/2)) ÷ (HBM
  bandwidth × TP)``, or is bound by compute, ``2 × active params × S ÷ (peak × TP)``, whichever
  is longer; S sequences run at once (``max_num_seqs``, vLLM's default 256, or as many as the
  KV cache holds at their mean length P + T/2). A sample's cost therefore grows with the
  square of its length. Prefill adds ``2 × active params × P`` per sample at peak.
- **train** (params with ``epochs`` and no engine: sft). ``6 × params × tokens`` at a stated
  MFU (``estimate.mfu``), tokens = examples × epochs × (P + T) capped at ``max_length``.

Figures, in this order of preference:
- prompts: the upstream output's row count when it is committed, else ``estimate.prompts``;
- completion tokens per sample and samples per prompt: the latest ``prompt_stats`` of the same
  stage of the same pipeline under the root, else ``estimate.expected_completion_tokens`` /
  ``samples_per_prompt``, else ``sampling.max_tokens`` / ``n`` (adaptive: ``max_samples``) as
  upper bounds;
- training examples: ``estimate.train_examples``, else the nearest upstream decode stage's
  samples × ``keep_fraction``.

Calibration: when the same stage of the same pipeline has run under the root, its record's
seconds (less engine start-up) over what this model predicts for that run's own figures is
the stage's calibration factor, and the estimate is multiplied by it (``calibration`` in the
output; 1.0 and ``"none"`` otherwise); that run's engine start-up is added once
(``startup_seconds``), so ``seconds`` is the stage's wall time. ``--price-per-gpu-hour`` turns GPU-hours into money.
The GPU is the stage's ``accelerator_type:<TYPE>`` resource (``pipeline/sizing/data/gpus.yaml``), else
``estimate.gpu``, else ``cpu`` for a stage without GPUs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.sizing import fit, hub
from pipeline.sizing.assumptions import EstimateSpec
from pipeline.store import layout

VLLM_DEFAULT_MAX_NUM_SEQS = 256


@dataclass
class StageEstimate:
    stage: str
    cost: str  # decode | train
    model: str
    gpu: str
    gpus: int  # GPUs the stage holds while it runs
    prompts: int | None = None
    samples: float | None = None
    completion_tokens_per_sample: float | None = None
    completion_tokens: float | None = None
    train_tokens: float | None = None
    raw_seconds: float = 0.0
    startup_seconds: float = 0.0  # engine start-up, as the last run measured it (decode)
    calibration: float = 1.0
    calibrated_from: str = "none"
    seconds: float = 0.0
    gpu_hours: float = 0.0
    cost_usd: float | None = None
    sources: dict[str, str] = field(default_factory=dict)


def decode_seconds(a: fit.Arch, g: fit.GPU, *, samples: float, prompt_tokens: float, completion_tokens: float,
                   tp: int = 1, replicas: int = 1, max_num_seqs: int | None = None,
                   utilization: float | None = None) -> dict:
    """Wall seconds for ``samples`` completions of ``completion_tokens`` each on ``replicas``
    replicas, by the decode roofline (see the module docstring)."""
    util = utilization or fit.VLLM_DEFAULT_UTILIZATION
    weights = a.params * a.dtype_bytes
    bw, peak = g.bandwidth_gbs * 1e9 * tp, g.bf16_tflops * 1e12 * tp
    kv_total = a.kv_bytes_per_token()
    mean_len = prompt_tokens + completion_tokens / 2
    cap_tokens = max(0.0, (g.memory_bytes * util - weights / tp)) / a.kv_bytes_per_token(tp)
    per_replica = samples / replicas
    s = max(1.0, min(max_num_seqs or VLLM_DEFAULT_MAX_NUM_SEQS, cap_tokens / max(1.0, mean_len), per_replica))
    step_mem = (weights + kv_total * s * mean_len) / bw
    step_flops = 2 * a.active_params * s / peak
    steps = per_replica * completion_tokens / s
    prefill = per_replica * 2 * a.active_params * prompt_tokens / peak
    seconds = steps * max(step_mem, step_flops) + prefill
    return {"seconds": seconds, "concurrent": s, "step_s": max(step_mem, step_flops),
            "bound": "memory" if step_mem >= step_flops else "compute"}


def train_seconds(a: fit.Arch, g: fit.GPU, tokens: float, mfu: float, workers: int = 1) -> float:
    return 6 * a.active_params * tokens / (g.bf16_tflops * 1e12 * mfu * workers)


def _gpu_of(resources: dict, num_gpus: float, spec: EstimateSpec) -> fit.GPU:
    name = fit.accelerator_of(resources) or spec.gpu or ("cpu" if num_gpus <= 0 else None)
    if name is None:
        raise ValueError("names no GPU type: add 'accelerator_type:<TYPE>' to its resources or set estimate.gpu")
    return fit.gpu(name)


class Estimator:
    def __init__(self, cfg, price_per_gpu_hour: float | None = None):
        from pipeline.core.runner import Runner

        self.cfg = cfg
        self.spec = EstimateSpec.model_validate(cfg.raw.get("estimate") or {})
        self.price = price_per_gpu_hour
        self.runner = Runner(cfg)
        self.storage = self.runner.storage
        self.entries = {e.name: e for e in self.runner.plan()}
        self.results: dict[str, StageEstimate] = {}

    # -- figures -----------------------------------------------------------
    def _model_of(self, name: str, field_: str) -> str | None:
        """A model param of stage ``name``; wired: the committed model, else the starting model
        of the stage it comes from (same architecture), else None."""
        node = self.cfg.nodes[name]
        value = getattr(node.stage.params, field_, None)
        if value:
            return value
        if field_ in node.inputs:
            up, out = node.inputs[field_]
            rec = self.entries[up].record
            if rec is not None and out in (rec.outputs or {}):
                return rec.outputs[out]["uri"]
            return self._model_of(up, "model")
        return None

    def _arch(self, uri: str | None) -> fit.Arch | None:
        cfg = fit.model_config(uri)
        return fit.arch(cfg) if cfg else None

    def _upstream_rows(self, name: str, inp: str) -> int | None:
        node = self.cfg.nodes[name]
        if inp not in node.inputs:
            return None
        up, out = node.inputs[inp]
        rec = self.entries[up].record
        return rec.rows.get(out) if rec is not None else None

    def _last_record(self, name: str, output: str):
        """The record of the stage's latest committed ``output`` in this pipeline, or None."""
        from pipeline.core.runner import StageRecord

        try:
            ptr = self.storage.read_json(layout.latest_pointer(self.storage, self.cfg.name, name, output))
            rec = self.storage.read_json(layout.stage_record(self.storage, self.cfg.nodes[name].cls.kind,
                                                             ptr["fingerprint"]))
        except (FileNotFoundError, KeyError):
            return None
        return StageRecord.from_json(rec)

    def _prompt_stats(self, rec) -> tuple[float, float] | None:
        """(completion tokens per sample, samples per prompt) from a record's prompt_stats."""
        out = (rec.outputs or {}).get("prompt_stats") if rec is not None else None
        if not out:
            return None
        t = self.storage.read_dataset(out["path"], columns=["samples", "completion_tokens"]).to_pydict()
        samples, tokens, prompts = sum(t["samples"]), sum(t["completion_tokens"]), len(t["samples"])
        if not samples:
            return None
        return tokens / samples, samples / prompts

    # -- stages ------------------------------------------------------------
    def decode(self, name: str) -> StageEstimate:
        node = self.cfg.nodes[name]
        eng = node.stage.params.engine
        g = _gpu_of(eng.resources, eng.num_gpus, self.spec)
        roles = [f for f in hub.MODEL_FIELDS if hasattr(node.stage.params, f) and self._model_of(name, f)]
        if not roles:
            raise ValueError("its model is built upstream and not committed yet (no config.json to read): "
                             "run the pipeline up to it first")
        last = self._last_record(name, next(iter(node.cls.outputs)))
        prompts, per_prompt, per_sample, sources = self._decode_workload(name, node, last)
        prompt_tokens = self.spec.for_stage(name, node.base).expected_prompt_tokens or 0
        samples = prompts * per_prompt
        raw, models = 0.0, []
        for role in roles:
            uri = self._model_of(name, role)
            if self._arch(uri) is None:
                raise ValueError(f"no config.json for {role} {uri} (not built yet?)")
            models.append(uri)
            raw += self._decode_seconds(name, role, g, samples, prompt_tokens, per_sample)
        est = StageEstimate(name, "decode", ", ".join(models), g.name, eng.replicas * eng.tensor_parallel_size,
                            prompts=prompts, samples=samples * len(models), completion_tokens_per_sample=round(per_sample, 1),
                            completion_tokens=samples * per_sample * len(models), raw_seconds=raw, sources=sources)
        if last is not None and last.seconds:
            self._calibrate_decode(est, name, roles, g, last, prompt_tokens)
        return self._finish(est)

    def _decode_seconds(self, name: str, role: str, g, samples: float, prompt_tokens: float,
                        completion_tokens: float) -> float:
        """The roofline's seconds for one model role of a decode stage (its engine's settings)."""
        eng = self.cfg.nodes[name].stage.params.engine
        return decode_seconds(self._arch(self._model_of(name, role)), g, samples=samples, prompt_tokens=prompt_tokens,
                              completion_tokens=completion_tokens, tp=eng.tensor_parallel_size, replicas=eng.replicas,
                              max_num_seqs=eng.max_num_seqs, utilization=eng.gpu_memory_utilization)["seconds"]

    def _decode_workload(self, name: str, node, last) -> tuple[int, float, float, dict[str, str]]:
        """(prompts, samples per prompt, completion tokens per sample, where each figure came from):
        the committed input and the last run's prompt stats where there are, else the config."""
        a_spec, s = self.spec.for_stage(name, node.base), node.stage.params.sampling
        sources: dict[str, str] = {"prompts": "committed input"}
        prompts = self._upstream_rows(name, "prompts")
        if prompts is None:
            prompts, sources["prompts"] = a_spec.prompts, "estimate.prompts"
        if prompts is None:
            raise ValueError("prompts unknown: its input is not committed yet; state estimate.prompts")
        stats = self._prompt_stats(last)
        if stats:
            per_sample, per_prompt = stats
            sources["completion_tokens"] = sources["samples_per_prompt"] = f"prompt_stats of run {last.run_id}"
        else:
            per_sample = a_spec.expected_completion_tokens or s.max_tokens
            sources["completion_tokens"] = ("estimate.expected_completion_tokens" if a_spec.expected_completion_tokens
                                            else "sampling.max_tokens (an upper bound)")
            if s.strategy != "adaptive":
                per_prompt, sources["samples_per_prompt"] = s.n, "sampling.n"
            elif a_spec.samples_per_prompt:
                per_prompt, sources["samples_per_prompt"] = a_spec.samples_per_prompt, "estimate.samples_per_prompt"
            else:
                per_prompt, sources["samples_per_prompt"] = s.max_samples, "sampling.max_samples (an upper bound)"
        return prompts, per_prompt, min(per_sample, s.max_tokens), sources

    def _calibrate_decode(self, est: StageEstimate, name: str, roles: list[str], g, last, prompt_tokens: float) -> None:
        """Scale by the last run's measured seconds over what the roofline predicts for its workload."""
        m = last.metrics
        done_samples = m.get("samples") or (last.rows or {}).get(next(iter(self.cfg.nodes[name].cls.outputs)))
        done_tokens = m.get("completion_tokens")
        if not (done_samples and done_tokens):
            return
        pred = sum(self._decode_seconds(name, role, g, done_samples, prompt_tokens, done_tokens / done_samples)
                   for role in roles)
        startup = float(m.get("engine_startup_seconds") or 0)
        actual = last.seconds - startup
        if pred > 0 and actual > 0:
            est.calibration, est.calibrated_from = actual / pred, f"run {last.run_id}"
            est.startup_seconds = startup

    def train(self, name: str) -> StageEstimate:
        node = self.cfg.nodes[name]
        p = node.stage.params
        a_spec = self.spec.for_stage(name, node.base)
        g = _gpu_of(p.resources, p.num_gpus, self.spec)
        uri = self._model_of(name, "model")
        a = self._arch(uri)
        if a is None:
            raise ValueError(f"no config.json for model {uri}" if uri else
                             "its model is built upstream and not committed yet (no config.json to read): "
                             "run the pipeline up to it first")
        sources: dict[str, str] = {}
        examples, per_example = a_spec.train_examples, None
        if examples is not None:
            sources["examples"] = "estimate.train_examples"
        up = self._upstream_decode(name)
        if up is not None:
            if examples is None:
                examples = up.samples * self.spec.keep_fraction  # a generation stage runs one model
                sources["examples"] = f"{up.stage} samples x keep_fraction {self.spec.keep_fraction:g}"
            per_example = (a_spec.expected_prompt_tokens or 0) + up.completion_tokens_per_sample
        if examples is None:
            rows = self._upstream_rows(name, "data")
            examples, sources["examples"] = rows, "committed input"
        if examples is None:
            raise ValueError("training examples unknown: state estimate.train_examples")
        if per_example is None:
            per_example = (a_spec.expected_prompt_tokens or 0) + (a_spec.expected_completion_tokens or p.max_length)
        per_example = min(per_example, p.max_length)
        tokens = (p.max_steps * p.batch_size if p.max_steps > 0 else examples * p.epochs) * per_example
        raw = train_seconds(a, g, tokens, self.spec.mfu, p.num_workers if g.name != "cpu" else 1)
        est = StageEstimate(name, "train", uri or "", g.name, p.num_workers if g.name != "cpu" else 0,
                            samples=examples, train_tokens=tokens, raw_seconds=raw,
                            sources={**sources, "mfu": f"estimate.mfu {self.spec.mfu:g}"})
        last = self._last_record(name, "model")
        if last is not None and last.metrics.get("train_tokens") and last.metrics.get("train_seconds"):
            pred = train_seconds(a, g, last.metrics["train_tokens"], self.spec.mfu,
                                 p.num_workers if g.name != "cpu" else 1)
            est.calibration, est.calibrated_from = last.metrics["train_seconds"] / pred, f"run {last.run_id}"
        return self._finish(est)

    def _upstream_decode(self, name: str) -> StageEstimate | None:
        seen, todo = set(), [up for up, _ in self.cfg.nodes[name].inputs.values()]
        while todo:
            up = todo.pop(0)
            if up in seen:
                continue
            seen.add(up)
            if up in self.results and self.results[up].cost == "decode":
                return self.results[up]
            todo.extend(u for u, _ in self.cfg.nodes[up].inputs.values())
        return None

    def _finish(self, est: StageEstimate) -> StageEstimate:
        est.seconds = est.raw_seconds * est.calibration + est.startup_seconds
        est.gpu_hours = est.seconds * max(est.gpus, 1 if est.gpu != "cpu" else 0) / 3600
        if self.price is not None:
            est.cost_usd = round(est.gpu_hours * self.price, 2)
        return est

    def run(self) -> dict[str, Any]:
        rows, problems = [], []
        for name in self.cfg.order():
            node = self.cfg.nodes[name]
            p = node.stage.params
            if self.entries[name].cached:
                continue
            try:
                if hasattr(p, "engine") and hasattr(p, "sampling"):
                    est = self.decode(name)
                elif hasattr(p, "epochs") and hasattr(p, "model"):
                    est = self.train(name)
                else:
                    continue
            except (ValueError, KeyError) as e:
                problems.append(f"{self.cfg.path}: stages.{name}: {e.args[0] if e.args else e}")
                continue
            self.results[name] = est
            rows.append(est)
        total = {"seconds": sum(r.seconds for r in rows), "gpu_hours": sum(r.gpu_hours for r in rows),
                 "completion_tokens": sum(r.completion_tokens or 0 for r in rows if r.cost == "decode"),
                 "cost_usd": round(sum(r.cost_usd or 0 for r in rows), 2) if self.price is not None else None}
        return {"pipeline": self.cfg.name, "stages": [_rounded(asdict(r)) for r in rows], "total": _rounded(total),
                "problems": problems, "price_per_gpu_hour": self.price}


def _rounded(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def estimate(cfg, price_per_gpu_hour: float | None = None) -> dict[str, Any]:
    return Estimator(cfg, price_per_gpu_hour).run()
