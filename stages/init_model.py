"""init_model: build a small randomly initialised causal LM from a config, with a tokenizer
trained locally on a corpus. Nothing is downloaded.

Input ``corpus``: a dataset with a ``messages`` column (chat rows) or text columns
named in ``text_fields``. Output ``model``: a Hugging Face folder (config,
safetensors weights, tokenizer with a chat template) that vLLM and TRL load.
Digits are split one per token, which small models need to learn arithmetic.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.stage import Stage, StageContext, StageError

SPECIAL = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(256, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=16, description="default 2 x hidden_size")
    max_position_embeddings: int = Field(512, ge=16)
    vocab_size: int = Field(384, ge=len(SPECIAL) + 257, description="tokenizer size to train")
    text_fields: list[str] = Field(default_factory=lambda: ["messages"])
    max_corpus_rows: int = Field(20000, ge=1)
    seed: int = 0


def _texts(rows: list[dict], fields: list[str]) -> list[str]:
    out = []
    for r in rows:
        for f in fields:
            v = r.get(f)
            if isinstance(v, list):
                out.extend(m["content"] for m in v if isinstance(m, dict) and m.get("content"))
            elif isinstance(v, str) and v:
                out.append(v)
    return out


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


class InitModel(Stage):
    kind: ClassVar[str] = "init_model"
    Params = Params
    requires: ClassVar[tuple] = ("torch", "transformers", "tokenizers")
    inputs: ClassVar[dict] = {"corpus": "dataset"}
    outputs: ClassVar[dict] = {"model": "model"}

    def needs(self) -> dict[str, dict[str, str]]:
        return {"corpus": {"|".join(self.params.text_fields): "any"}}

    def run(self, ctx: StageContext) -> None:
        import torch
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        p: Params = self.params
        if p.hidden_size % p.num_heads:
            raise StageError(f"hidden_size {p.hidden_size} is not a multiple of num_heads {p.num_heads}")
        table = ctx.read_input("corpus")
        fields = [f for f in p.text_fields if f in table.column_names]
        if not fields:
            raise StageError(f"corpus has none of the text_fields {p.text_fields} (columns: {table.column_names})")
        texts = _texts(table.slice(0, p.max_corpus_rows).select(fields).to_pylist(), fields)
        if not texts:
            raise StageError("corpus has no text to train a tokenizer on")
        tok = build_tokenizer(texts, p.vocab_size)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=p.hidden_size,
            intermediate_size=p.intermediate_size or 2 * p.hidden_size,
            num_hidden_layers=p.num_layers,
            num_attention_heads=p.num_heads,
            num_key_value_heads=p.num_kv_heads or p.num_heads,
            max_position_embeddings=p.max_position_embeddings,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        )
        torch.manual_seed(p.seed)
        model = LlamaForCausalLM(cfg)
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out = ctx.scratch_dir()
        model.save_pretrained(out)
        tok.save_pretrained(out)
        ctx.put_model("model", out)
        ctx.metrics.update({"parameters": sum(x.numel() for x in model.parameters()), "vocab_size": len(tok)})
