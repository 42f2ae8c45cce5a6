"""Chat templates of real reasoning families, end to end (issue 24), with a locally built
template that behaves as theirs do:
- DeepSeek-R1-distill: the generation prompt pre-fills ``<think>`` and every assistant turn is
  rendered with only what follows ``</think>``. The verifier's format gate accepts a completion
  whose opening ``<think>`` was pre-filled; SFT still trains on the whole think block.
- Qwen3's ``enable_thinking``: passed through ``chat_template_kwargs`` to generation; here the
  template thinks only when it is set, so without it nothing verifies.
"""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import R1_LIKE_TEMPLATE as R1_LIKE
from conftest import output_rows, run_stages, write_jsonl


def _with_template(model_dir: str, template: str) -> str:
    """A copy of a local model whose tokenizer carries ``template``."""
    out = Path(tempfile.mkdtemp(prefix="templated-"))
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    (out / "chat_template.jinja").unlink(missing_ok=True)  # it would win over tokenizer_config.json's
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(out)


def test_reasoning_rewrite_is_detected_only_where_the_template_does_it(tiny_model):
    from transformers import AutoTokenizer

    from stages.sft import _converter, template_rewrites_reasoning, to_prompt_completion  # noqa: F401

    assert not template_rewrites_reasoning(AutoTokenizer.from_pretrained(tiny_model))
    assert _converter(tiny_model) is to_prompt_completion  # the toy template's rows go to TRL unchanged
    assert template_rewrites_reasoning(AutoTokenizer.from_pretrained(_with_template(tiny_model, R1_LIKE)))


@pytest.mark.engine
def test_prefilled_think_generates_verifies_and_trains_with_its_reasoning(solver_model, solver_eval_rows, tiny_model,
                                                                          tmp_path):
    from transformers import AutoTokenizer

    from pipeline.core.resources import localize_model
    from stages.sft import Params, build_trainer, training_dataset

    rows = solver_eval_rows[:16]
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    cfg = tmp_path / "templates.yaml"
    cfg.write_text(f"""
name: templates
storage: {{root: {tmp_path}/root}}
stages:
  prompts: {{params: {{path: {src}}}}}
  generate:
    inputs: {{prompts: prompts.prompts}}
    params:
      model: {solver_model}
      chat_template: {json.dumps(R1_LIKE)}
      chat_template_kwargs: {{enable_thinking: true}}
      sampling: {{n: 2, temperature: 0.5, max_tokens: 48, seed: 0}}
      engine: {{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 8}}
  verify: {{inputs: {{samples: generate.samples}}}}
  dedupe:
    inputs: {{samples: verify.verified}}
    params: {{require_verdict: correct}}
""")
    stages, st = run_stages(cfg)
    verified = output_rows(st, stages["verify"], "verified")
    assert len(verified) == 32
    # the engine rendered the prompt with enable_thinking set: its token count is that rendering's
    tok = AutoTokenizer.from_pretrained(localize_model(solver_model))
    for r in verified:
        msgs = [{"role": "user", "content": r["prompt"]}]
        on, off = (tok(tok.apply_chat_template(msgs, chat_template=R1_LIKE, add_generation_prompt=True, tokenize=False,
                                               **kw), add_special_tokens=False)["input_ids"]
                   for kw in ({"enable_thinking": True}, {}))
        assert r["prompt_tokens"] == len(on) != len(off)
    assert all(not r["completion"].lstrip().startswith("<think>") for r in verified)  # pre-filled, not generated
    correct = [r for r in verified if r["verdict"] == "correct"]
    assert correct, [(r["completion"], r["reason"]) for r in verified]  # the format gate takes the pre-filled think
    assert all("</think>" in r["completion"] for r in correct)

    # SFT on a model whose template drops reasoning from assistant turns: the target keeps it
    sft_rows = output_rows(st, stages["dedupe"], "sft")
    assert sft_rows and all("</think>" in r["messages"][-1]["content"] for r in sft_rows)
    student = _with_template(tiny_model, R1_LIKE)
    files = [f"{st.strip(stages['dedupe']['output']['sft'])}/{s['path']}"
             for s in st.dataset_manifest(st.strip(stages["dedupe"]["output"]["sft"]))["shards"]]
    kw = {"enable_thinking": True}  # as generation rendered the prompts
    data = training_dataset(files, str(tmp_path / "cache"), student, kw)
    trainer = build_trainer(student, data, Params(model=student, max_steps=1, batch_size=4, chat_template_kwargs=kw),
                            tempfile.mkdtemp())
    stok = trainer.processing_class
    targets = {row["messages"][-1]["content"] + "<|end|>" for row in sft_rows}
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        ids, labels = ids[mask.bool()], labels[mask.bool()]
        prompt = stok.decode(ids[labels == -100])
        target = stok.decode(ids[labels != -100])
        assert prompt.endswith("<|assistant|><think>\n")  # the context the engine gave the teacher
        assert target in targets  # the whole reasoning, then EOS
