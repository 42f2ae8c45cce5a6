"""Shared fixtures: one local Ray, one moto S3 server on 127.0.0.1, one tiny model.

vLLM engines are kept alive across tests (``DISTILL_KEEP_ENGINES=1``) because each
start costs tens of seconds here; Ray gets more logical CPUs than the machine has so
a kept engine never blocks a training task from being scheduled.
"""
from __future__ import annotations

import faulthandler
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ["DISTILL_KEEP_ENGINES"] = "1"
# the session's engines: the toy model's (one for every single-replica test: a test that needs fewer
# sequences in the engine sets the client's max_inflight, not the engine's max_num_seqs), the
# solver's, the solver's with the R1-like template, and test_pipeline_e2e's student; with 3 kept the
# least recent was often started again (~28 s each)
os.environ.setdefault("DISTILL_MAX_KEPT_ENGINES", "5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller checks on its workers every 2 s by default, so every training run (sft, dpo,
# grpo, the solver) is seen to finish up to 2 s late; a check a worker misses is only an error after
# RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min), so a shorter interval fails nothing sooner
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("DISTILL_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"distill-test-cache-{os.getpid()}"))


# A crash of the pytest process itself (a fatal signal in native code: Ray, torch, numba, Arrow)
# names its test: with DISTILL_TEST_CRASH_LOG set (tools/run_tests.py, which `make test` runs, sets
# it and turns pytest's own faulthandler off), that file holds the test last started and, after a
# crash, every thread's stack ("Current thread" is the one that crashed); tools/run_tests.py prints
# both when pytest dies of a signal.
_CRASH_LOG = open(os.environ["DISTILL_TEST_CRASH_LOG"], "w") if os.environ.get("DISTILL_TEST_CRASH_LOG") else None
if _CRASH_LOG is not None:
    faulthandler.enable(_CRASH_LOG, all_threads=True)


def pytest_runtest_logstart(nodeid, location):
    if _CRASH_LOG is not None:
        _CRASH_LOG.seek(0)
        _CRASH_LOG.truncate()
        _CRASH_LOG.write(f"last test started: {nodeid}\n")
        _CRASH_LOG.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_s3_endpoint():
    """A moto S3 server (a test double of S3) on 127.0.0.1; the standard AWS variables point at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def moto_s3_bucket(moto_s3_endpoint):
    """The test bucket on the moto S3 server (a test double of S3: real S3 cannot be reached here)."""
    import boto3

    boto3.client("s3", endpoint_url=moto_s3_endpoint).create_bucket(Bucket="distill-test")
    return "distill-test"


@pytest.fixture(scope="session")
def ray_local(moto_s3_endpoint):
    """Started after the S3 variables are set, so Ray workers inherit them."""
    import ray

    # explicit, so a token file on the machine (~/.ray/auth_token) cannot change the outcome
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)  # never join another Ray
    yield
    from stages.common.engine import shutdown_kept

    shutdown_kept()
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama with a tokenizer trained here on toy arithmetic text."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.init_model import build_tokenizer
    from stages.toy_task import make_problem

    rng = random.Random(0)
    texts = [t for _ in range(300) for t in make_problem(rng, 2, 3, 20)[:2]]
    tok = build_tokenizer(texts, 300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path



def prompts_then(tmp_path: Path, rows: list, stage: str, params: str, prompts_params: str = "") -> Path:
    """``p.yaml``: a two-stage pipeline, the prompts stage over ``rows`` (written as JSONL) and
    then ``stage`` reading ``prompts.prompts`` as its ``samples``; ``params`` and
    ``prompts_params`` (extra keys for prompts) are YAML flow mappings / their contents."""
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: {stage}-test
storage: {{root: {tmp_path}/root}}
stages:
  prompts: {{params: {{path: {src}{", " + prompts_params if prompts_params else ""}}}}}
  {stage}:
    inputs: {{samples: prompts.prompts}}
    params: {params}
""")
    return cfg


def generate_config(tmp_path: Path, name: str, src: Path, model: str, sampling: str, engine: str,
                    extra: str = "") -> Path:
    """A two-stage pipeline (prompts -> generate) for the generation tests; ``sampling`` and
    ``engine`` are YAML flow mappings."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
name: {name}
storage: {{root: {tmp_path}/root}}
{extra}
stages:
  prompts: {{params: {{path: {src}}}}}
  generate:
    inputs: {{prompts: prompts.prompts}}
    params: {{model: {model}, sampling: {sampling}, engine: {engine}}}
""")
    return cfg


def run_stages(cfg) -> tuple[dict, "object"]:
    """Run a config (a path or a loaded config) that must succeed; returns (stage records by
    name, the run's Storage)."""
    from pipeline.core.config import load_config
    from pipeline.core.runner import Runner

    runner = Runner(cfg if hasattr(cfg, "nodes") else load_config(cfg))
    result = runner.run()
    assert result.ok, result.error
    return {s["name"]: s for s in result.manifest["stages"]}, runner.storage


def output_rows(storage, record: dict, output: str) -> list[dict]:
    """The rows of one output of a stage record."""
    return storage.read_dataset(storage.strip(record["output"][output])).to_pylist()


def pid_running(pid: int) -> bool:
    """Whether the process exists and is not a zombie awaiting its reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def process_tree(pid: int) -> set[int]:
    """pid and all its descendants, from /proc. Walked here, not by ``pipeline.ops.supervise``:
    the tests that check supervise stops a whole tree need a walk of their own to check with."""
    import os

    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def still_running(pids: set[int], wait: float = 30.0) -> set[int]:
    """Those of ``pids`` still running after waiting up to ``wait`` seconds for them to go."""
    import time

    deadline = time.time() + wait
    while True:
        left = {p for p in pids if pid_running(p)}
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), so a reused pid is not taken for it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant at once, as a crashed machine would lose them: the
    tree is frozen (SIGSTOP) first, so no Ray worker (each leads a process group of its own, out
    of reach of ``killpg``) trains or registers another step while the rest die."""
    import os
    import signal

    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for _ in range(3):  # walk again: a process may have forked before it was stopped
            for p in process_tree(pid):
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass


class ProcessWatch:
    """Every process seen in the tree under ``root`` (walked through /proc, not by process
    group: a Ray worker or actor leads a process group of its own, and a vLLM engine core is
    its child) while the watch runs, sampled every ``interval`` seconds on a thread.
    ``survivors()`` lists those still running (same pid and start time, not a zombie)."""

    def __init__(self, root: int, interval: float = 0.2):
        import threading

        self.root, self.interval = root, interval
        self.seen: dict[tuple[int, int], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        for pid in process_tree(self.root):
            started = _start_time(pid)
            if started is not None:  # read again each time: a Ray worker renames itself (ray::EngineActor)
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    cmd = ""
                if cmd or (pid, started) not in self.seen:  # a zombie's empty command line keeps the last one
                    self.seen[(pid, started)] = cmd

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> "ProcessWatch":
        self._stop.set()
        self._thread.join()
        return self

    def raylets(self) -> set[int]:
        """Pids of the raylets seen in the tree."""
        return {pid for (pid, _), cmd in self.seen.items() if cmd.split(" ", 1)[0].endswith("/raylet")}

    def survivors(self, wait: float = 30.0) -> list[str]:
        """``pid cmdline`` of every process still running after waiting up to ``wait`` s that was
        watched in the tree, or that belongs to a watched raylet's Ray by its environment
        (``RAY_RAYLET_PID``, which Ray workers carry and everything they start inherits, so a
        process that left the tree, e.g. by a double fork, is found too)."""
        import time

        self.stop()
        marks = {f"RAY_RAYLET_PID={pid}".encode() for pid in self.raylets()}
        deadline = time.time() + wait
        while True:
            left = {pid: cmd for (pid, started), cmd in self.seen.items()
                    if pid_running(pid) and _start_time(pid) == started}
            for d in os.listdir("/proc"):
                if marks and d.isdigit() and int(d) not in left and int(d) != os.getpid():
                    try:
                        with open(f"/proc/{d}/environ", "rb") as f:
                            env = set(f.read().split(b"\0"))
                        with open(f"/proc/{d}/cmdline", "rb") as f:
                            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    except OSError:
                        continue
                    if env & marks and pid_running(int(d)):
                        left[int(d)] = cmd
            if not left or time.time() > deadline:
                return [f"{pid} {cmd}" for pid, cmd in sorted(left.items())]
            time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_jobs_head(moto_s3_endpoint):
    """A private Ray head (`ray start --head`, token auth, 127.0.0.1) shared by the Jobs tests;
    its environment holds tests/ray_head.py's fake secrets and points S3 at moto. Stopped at the end."""
    from ray_head import start_jobs_head

    head = start_jobs_head(moto_s3_endpoint)
    yield head
    head.stop()


SOLVER_CONFIG = """
name: solver-model
storage: {{root: {root}}}
stages:
  toy_task:  # 2-step sums and differences of single digits; the held-out split is 'eval'
    params: {{seed: 0, train_size: {train}, distill_size: 1, eval_size: 64, min_steps: 2, max_steps: 2,
             max_operand: 9, easy_fraction: 1.0}}
  solver_data:
    uses: dedupe
    inputs: {{samples: toy_task.train}}
    params: {{completion_field: solution, require_verdict: null}}
  solver_init:
    uses: init_model
    inputs: {{corpus: solver_data.sft}}
    params: {{hidden_size: 128, num_layers: 2, num_heads: 4, max_position_embeddings: 128, seed: 0}}
  solver_sft:
    uses: sft
    inputs: {{data: solver_data.sft, model: solver_init.model}}
    params: {{epochs: {epochs}, learning_rate: 3.0e-3, warmup_ratio: 0.05, batch_size: 32, max_length: 128, seed: 0,
             num_cpus: 1, checkpoint_every: 1000, logging_steps: 50}}
"""


@pytest.fixture(scope="session")
def solver_run(ray_local, tmp_path_factory):
    """A tiny Llama that solves some toy problems: trained once per session by the project's own
    stages (toy_task gold solutions -> dedupe -> init_model -> sft on Ray Train), a short schedule.
    Returns (the committed model's URI, the held-out toy problems: prompt_id, prompt, answer)."""
    root = tmp_path_factory.mktemp("solver")
    cfg = root / "solver.yaml"
    store = os.environ.get("DISTILL_SOLVER_ROOT") or root / "store"  # a kept root: later sessions reuse the cache
    cfg.write_text(SOLVER_CONFIG.format(root=store, train=int(os.environ.get("DISTILL_SOLVER_TRAIN", 1000)),
                                        epochs=int(os.environ.get("DISTILL_SOLVER_EPOCHS", 10))))
    stages, st = run_stages(cfg)
    held_out = [{k: r[k] for k in ("prompt_id", "prompt", "answer")} for r in output_rows(st, stages["toy_task"], "eval")]
    return stages["solver_sft"]["output"]["model"], held_out


@pytest.fixture(scope="session")
def solver_model(solver_run) -> str:
    """The URI of the session's toy-task solver (see ``solver_run``), usable as a generate/evaluate model."""
    return solver_run[0]


@pytest.fixture(scope="session")
def solver_eval_rows(solver_run) -> list[dict]:
    """Toy problems the solver never trained on (prompt_id, prompt, answer), like its training ones."""
    return solver_run[1]


# -- skips in CI --------------------------------------------------------------------------
# Outside CI a test may skip where this machine lacks a capability (Chromium, sandbox
# isolation, `ss`, ../shared, bubblewrap). In CI (CI=true) those are required: .ci/run
# installs them, so a skip there means one is missing and the run fails, naming it. The one
# skip CI allows is a bubblewrap variant on a machine whose kernel blocks user namespaces,
# and that skip's reason carries USERNS_BLOCKED.
USERNS_BLOCKED = "user namespaces are blocked on this machine"
CAPABILITIES = (  # (words in a skip reason, the capability it names)
    (("chromium",), "Chromium (Debian's chromium, installed by .ci/run)"),
    (("sandbox", "isolation", "namespace"), "sandbox isolation (unshare/bwrap namespaces)"),
    (("bwrap", "bubblewrap"), "bubblewrap (Debian's bubblewrap, installed by .ci/run)"),
    (("ss ", "iproute2", "(ss)"), "`ss` (iproute2)"),
    (("shared",), "../shared (the shared data sets beside the repository)"),
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_capability(reason: str) -> str:
    """The required capability a skip reason names (or a generic label)."""
    low = f"{reason.lower()} "
    for words, name in CAPABILITIES:
        if any(w in low for w in words):
            return name
    return "an unnamed capability"


def ci_skip_failure(reason: str) -> str | None:
    """Why a skip with ``reason`` fails the run in CI, or None where it may skip (outside CI,
    or a bubblewrap variant where user namespaces are blocked)."""
    if not in_ci() or USERNS_BLOCKED in reason:
        return None
    return (f"CI=true: a required capability is missing here: {skip_capability(reason)}; "
            f"this test would have skipped with: {reason}")


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, "wasxfail"):
        why = ci_skip_failure(_skip_reason(rep.longrepr))
        if why:
            rep.outcome, rep.longrepr = "failed", why


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped:
        why = ci_skip_failure(_skip_reason(rep.longrepr))
        if why:
            rep.outcome, rep.longrepr = "failed", why


def run_stage_on_rows(root: Path, stage_cls, params: dict, inputs: dict[str, list[dict]],
                      rows_per_shard: int = 50_000):
    """A stage's run() on committed input datasets made of ``inputs`` (name -> rows) under
    ``root``, without a pipeline around it: ``(the StageContext, the stage)``."""
    import pyarrow as pa

    from pipeline.core.stage import Artifact, StageContext
    from pipeline.store.storage import Storage

    st = Storage(str(root))
    arts = {}
    for name, rows in inputs.items():
        src = st.path("in", name)
        w = st.dataset_writer(src, rows_per_shard=rows_per_shard)
        w.write(pa.Table.from_pylist(rows))
        w.commit()
        arts[name] = Artifact("dataset", src, st.uri(src), f"f-{name}")
    stage = stage_cls(stage_cls.kind, stage_cls.Params(**params))
    ctx = StageContext(name=stage_cls.kind, kind=stage_cls.kind, fingerprint="f", run_id="r", storage=st,
                       inputs=arts, output_root=st.path("out"), output_types=dict(stage_cls.outputs))
    stage.run(ctx)
    return ctx, stage


def run_dedupe_stage(root: Path, rows: list[dict], rows_per_shard: int = 50_000, **params):
    """The dedupe stage's run() on a committed input dataset of ``rows`` under ``root`` (rows
    that share a prompt_id cannot come from the prompts stage, which drops repeated prompts):
    ``(sft table, dropped table, the StageContext, the stage's params)``."""
    from stages.dedupe import Dedupe

    ctx, stage = run_stage_on_rows(root, Dedupe, params, {"samples": rows}, rows_per_shard)
    sft, dropped = (ctx.storage.read_dataset(ctx.written[out].path) for out in ("sft", "dropped"))
    return sft, dropped, ctx, stage.params


# A chat template that behaves as DeepSeek-R1-distill's and Qwen3's do (tests/test_templates.py):
# every assistant turn keeps only what follows </think>; the generation prompt pre-fills <think>,
# or an empty think block unless enable_thinking is passed. For tests/test_soft_failure.py it
# also refuses a prompt holding UNTOKENIZABLE and renders nothing for one holding EMPTY-PROMPT
# (vLLM's add_request rejects an empty prompt). One template, so both tests share one engine.
R1_LIKE_TEMPLATE = (
    "{% for m in messages %}{% if 'UNTOKENIZABLE' in m['content'] %}"
    "{{ raise_exception('this template refuses the prompt') }}{% endif %}{% endfor %}"
    "{% if 'EMPTY-PROMPT' not in messages[-1]['content'] %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|assistant|>{{ c }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking %}<think>\n{% else %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}{% endif %}"
)
