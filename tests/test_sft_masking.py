"""The sft stage's trainer puts loss on assistant tokens only."""
import tempfile

import torch

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
