"""The sft stage's trainer puts loss on assistant tokens only."""
import tempfile
from unittest import mock

import pytest
import torch
from transformers import Trainer

from stages.sft import Params, build_trainer, to_prompt_completion


def test_prompt_completion_split():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert to_prompt_completion(msgs) == {"prompt": msgs[:2], "completion": msgs[2:]}
    assert to_prompt_completion(msgs[:2]) is None


def test_loss_only_on_assistant_tokens(tiny_model):
    rows = [{"messages": [{"role": "user", "content": f"Compute {i} + 1."},
                          {"role": "assistant", "content": f"<think>\n{i} + 1 = {i + 1}\n</think>\n\\boxed{{{i + 1}}}"}]}
            for i in range(8)]
    trainer = build_trainer(tiny_model, rows, Params(model=tiny_model, max_steps=1, batch_size=4), tempfile.mkdtemp())
    tok = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        ids, labels = ids[mask.bool()], labels[mask.bool()]
        text = tok.decode(ids)
        start = text.index("<|assistant|>") + len("<|assistant|>")
        # tokens up to and including the assistant marker carry no loss; the answer and <|end|> do
        prefix_len = len(tok(text[:start], add_special_tokens=False)["input_ids"])
        assert torch.all(labels[:prefix_len] == -100)
        assert torch.all(labels[prefix_len:] == ids[prefix_len:])
        assert tok.decode(ids[prefix_len:]).endswith("<|end|>")


def _logged(tiny_model, rows, lm_head: str, batching: str = "padded", logging_steps: int = 1) -> list[dict]:
    p = Params(model=tiny_model, max_steps=4, batch_size=8, learning_rate=1e-3, logging_steps=logging_steps,
               batching=batching, checkpoint_every=1000, lm_head=lm_head)
    trainer = build_trainer(tiny_model, rows, p, tempfile.mkdtemp())
    calls = []  # the model's own forward with labels goes through transformers' Trainer.compute_loss
    plain = trainer.__class__.__mro__[2].compute_loss  # StageSFTTrainer -> SFTTrainer -> Trainer
    assert plain is Trainer.compute_loss
    with mock.patch.object(Trainer, "compute_loss", lambda *a, **kw: calls.append(1) or plain(*a, **kw)):
        trainer.train()
    assert len(calls) == (4 if lm_head == "full" else 0)  # TRL's fused head never calls it
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("batching", ["padded", "padding_free"])
def test_full_logits_loss_and_metrics_equal_trl_fused_head(tiny_model, batching):
    """``lm_head: full`` takes the loss from the model's own forward with labels (as a plain
    loop does) instead of TRL's fused LM head (the default): the same loss, step by step, and
    the same entropy, token accuracy and token count on the logged steps."""
    rows = [{"messages": [{"role": "user", "content": f"Compute {i} + {i % 7}."},
                          {"role": "assistant", "content": f"<think>\n{i} + {i % 7} = {i + i % 7}\n</think>\n"
                                                           f"\\boxed{{{i + i % 7}}}"}]} for i in range(32)]
    full, fused = _logged(tiny_model, rows, "full", batching), _logged(tiny_model, rows, "fused", batching)
    assert [h["step"] for h in full] == [h["step"] for h in fused] == [1, 2, 3, 4]
    assert full[-1]["loss"] < full[0]["loss"]  # it learns
    for a, b in zip(full, fused):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
        assert a["mean_token_accuracy"] == pytest.approx(b["mean_token_accuracy"], abs=1e-6)
        assert a["num_tokens"] == b["num_tokens"]
    # entropy, accuracy and the token count are computed on logging steps only, and logged there
    sparse = _logged(tiny_model, rows, "full", batching, logging_steps=2)
    assert [h["step"] for h in sparse] == [2, 4]
    assert [h["entropy"] for h in sparse] == pytest.approx([full[1]["entropy"], full[3]["entropy"]], rel=1e-5)
    assert [h["num_tokens"] for h in sparse] == [full[1]["num_tokens"], full[3]["num_tokens"]]


def test_lm_head_auto_takes_the_full_forward_only_when_the_logits_are_small(tiny_model):
    """``lm_head: auto`` (the default) materializes the logits only when one micro-batch's float32
    logits fit in 256 MiB: a 384-token vocabulary at the demo's batch does, Qwen's 151,936 at
    4,096 tokens does not. Explicit choices are kept."""
    demo = Params(batch_size=32, max_length=256)
    assert demo.lm_head == "auto"
    assert demo.resolved_lm_head(384) == "full"  # 32 x 256 x 384 x 4 B = 12.6 MB
    qwen = Params(batch_size=8, max_length=4096)
    assert qwen.resolved_lm_head(151_936) == "fused"  # 8 x 4096 x 151936 x 4 B = 19.9 GB
    # the bound: 256 MiB is 2^26 float32 logits
    assert Params(batch_size=1, max_length=2**13).resolved_lm_head(2**13) == "full"
    assert Params(batch_size=1, max_length=2**13).resolved_lm_head(2**13 + 1) == "fused"
    # accumulation splits the micro-batch; workers do not enter (the choice is keyed by fingerprinted settings)
    assert Params(batch_size=8, grad_accum=8, max_length=4096).resolved_lm_head(151_936) == "fused"
    assert Params(batch_size=64, grad_accum=64, max_length=256).resolved_lm_head(151_936) == "full"  # 156 MB
    assert (Params(batch_size=64, num_workers=8, max_length=512).resolved_lm_head(384)
            == Params(batch_size=64, num_workers=1, max_length=512).resolved_lm_head(384))
    assert Params(batching="padding_free").resolved_lm_head(384) == "fused"  # rows are not truncated there
    assert Params(lm_head="fused").resolved_lm_head(384) == "fused"
    assert Params(lm_head="full").resolved_lm_head(151_936) == "full"
    # on a real (tiny) model the trainer takes the decided path: the model's own forward goes
    # through transformers' Trainer.compute_loss, TRL's fused head never does
    rows = [{"messages": [{"role": "user", "content": "Compute 1 + 1."},
                          {"role": "assistant", "content": "<think>\n1 + 1 = 2\n</think>\n\\boxed{2}"}]}] * 4
    plain = Trainer.compute_loss
    for batching, head, own_forward_calls in [("padded", "full", 1), ("padding_free", "fused", 0)]:
        p = Params(model=tiny_model, max_steps=1, batch_size=4, batching=batching, checkpoint_every=1000)
        trainer = build_trainer(tiny_model, rows, p, tempfile.mkdtemp())
        assert trainer.lm_head == head
        calls = []
        with mock.patch.object(Trainer, "compute_loss", lambda *a, **kw: calls.append(1) or plain(*a, **kw)):
            trainer.train()
        assert len(calls) == own_forward_calls
