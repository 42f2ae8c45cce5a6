"""decontaminate: benchmark questions planted in the training data are removed and reported;
eval-set problems are clear errors, never holes in the check."""
import json

import pytest
from conftest import SHARED_DATA, output_rows, prompts_then, run_stages, write_jsonl

from pipeline.core.config import ConfigError, load_config

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"
TRAIN = [{"prompt": "What is the capital of the small country that lies between France and Spain?", "answer": "x"},
         {"prompt": "Compute 2 + 2.", "answer": "4"}]


def _config(tmp_path, rows: list[dict], params: str):
    """prompts -> decontaminate over ``rows``; ``params``: decontaminate's params, a YAML flow mapping."""
    return prompts_then(tmp_path, rows, "decontaminate", params)


def _file_config(tmp_path, eval_path, field: str):
    return _config(tmp_path, TRAIN, f"{{ngram: 8, eval_files: [{{path: {eval_path}, field: {field}}}]}}")


def _run(cfg) -> tuple[dict, list[dict], list[dict], object]:
    """The decontaminate stage record, its clean rows, its report rows and the run's storage."""
    records, st = run_stages(cfg)
    stage = records["decontaminate"]
    return stage, output_rows(st, stage, "clean"), output_rows(st, stage, "contaminated"), st


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="../shared/data not present")
def test_planted_benchmark_question_is_removed(ray_local, tmp_path):
    planted = json.loads(GSM8K_TEST.open().readlines()[41])["question"]
    rows = [{"prompt": f"Compute {i} + {i}.", "answer": str(2 * i)} for i in range(1, 30)]
    # lightly reworded: a different opening, the same body
    rows.insert(7, {"prompt": "Please solve: " + planted, "answer": "1"})
    cfg = _config(tmp_path, rows, f"{{ngram: 13, eval_files: [{{path: {GSM8K_TEST}, field: question}}]}}")
    stage, clean, report, st = _run(cfg)
    assert len(clean) == 29 and all(not r["prompt"].startswith("Please solve") for r in clean)
    (hit,) = report
    assert hit["eval_source"] == "gsm8k/test" and hit["eval_id"] == "41"
    assert hit["eval_text"] == planted and hit["field"] == "prompt"
    assert stage["dropped"] == {"removed": {"contaminated:gsm8k/test": 1}}
    assert stage["metrics"]["eval_items"] == 1319
    stats = st.dataset_manifest(st.strip(stage["output"]["clean"]))["stats"]
    assert stats == {"input_rows": len(clean) + 1, "dropped": {"removed": {"contaminated:gsm8k/test": 1}}}


def test_eval_file_problems_are_config_errors(tmp_path):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"problem": "Name the capital of Andorra.", "answer": "x"}] * 3)
    with pytest.raises(ConfigError) as err:
        load_config(_file_config(tmp_path, evals, "question"))  # the field is `problem`
    assert "p.yaml: stages.decontaminate.params.eval_files.0.field: no text in field 'question'" in str(err.value)
    assert "['answer', 'problem']" in str(err.value)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "a"}\n{"problem": "b"}\n{"problem": "c", \n')
    with pytest.raises(ConfigError, match=r"eval_files.0.path: eval file .*broken.jsonl, line 3: not JSON"):
        load_config(_file_config(tmp_path, broken, "problem"))


def test_eval_rows_without_text_are_counted_not_hidden(ray_local, tmp_path):
    evals = write_jsonl(tmp_path / "eval.jsonl", [
        {"problem": "What is the capital of the small country that lies between France and Spain?"},
        {"problem": None}, {"other": "no problem field"}, {"problem": "   "}])
    metrics = _run(_file_config(tmp_path, evals, "problem"))[0]["metrics"]
    assert metrics["eval_items"] == 1 and metrics["removed"] == 1
    assert metrics["eval_rows_without_text"] == {str(evals): 3}


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="../shared/data not present")
def test_named_eval_sets_from_the_registry(ray_local, tmp_path):
    math500 = [json.loads(line) for line in (SHARED_DATA / "math500" / "test.jsonl").open()]
    aime = json.loads((SHARED_DATA / "aime24" / "test.jsonl").open().readline())
    prefix = "Return your final response within \\boxed{}."
    body = math500[3]["problem"][len(prefix):].strip()
    rows = [{"prompt": body, "answer": "1"},                       # a MATH-500 problem without its boilerplate
            {"prompt": aime["problem"], "answer": "2"},            # an AIME 2024 problem
            # the boilerplate and the opening words of a MATH-500 problem: a 13-gram of the raw file,
            # but not a copy of the problem
            {"prompt": f"{prefix} {' '.join(body.split()[:3])} the number of apples in a basket of seven.",
             "answer": "3"},
            {"prompt": "Compute 3 + 4.", "answer": "7"}]
    cfg = _config(tmp_path, rows, f"{{ngram: 13, eval_sets: [all], eval_data_root: {SHARED_DATA}}}")
    stage, clean, report, _ = _run(cfg)
    assert [r["prompt"] for r in clean] == [rows[2]["prompt"], rows[3]["prompt"]]
    assert sorted((r["eval_source"], r["eval_id"]) for r in report) == [
        ("aime24", str(aime["id"])), ("math500", math500[3]["unique_id"])]
    assert stage["metrics"]["eval_items"] == 1319 + 500 + 30 + 40

    with pytest.raises(ConfigError, match=r"p.yaml.*eval_sets.*unknown eval set\(s\) \['gsm9k'\]"):
        load_config(cfg, overrides=["stages.decontaminate.params.eval_sets=[gsm9k]"])
    with pytest.raises(ConfigError, match=r"p.yaml: stages.decontaminate.params.eval_data_root: no eval file at"):
        load_config(cfg, overrides=[f"stages.decontaminate.params.eval_data_root={tmp_path}/nothing"])
