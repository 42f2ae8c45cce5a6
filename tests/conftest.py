"""Shared fixtures: one local Ray, one moto S3 server on 127.0.0.1, one tiny model.

vLLM engines are kept alive across tests (``DISTILL_KEEP_ENGINES=1``) because each
start costs tens of seconds here; Ray gets more logical CPUs than the machine has so
a kept engine never blocks a training task from being scheduled.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ["DISTILL_KEEP_ENGINES"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISTILL_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"distill-test-cache-{os.getpid()}"))


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

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)  # never join another Ray
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
    from pipeline.config import load_config
    from pipeline.runner import Runner

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
    """pid and all its descendants, from /proc."""
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


@pytest.fixture(scope="session")
def ray_jobs_head(moto_s3_endpoint):
    """A private Ray head (`ray start --head`, token auth, 127.0.0.1) shared by the Jobs tests;
    its environment holds tests/ray_head.py's fake secrets and points S3 at moto. Stopped at the end."""
    from ray_head import start_jobs_head

    head = start_jobs_head(moto_s3_endpoint)
    yield head
    head.stop()
