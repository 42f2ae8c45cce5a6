"""Chat rows rendered for TRL's trainers when a model's template would drop the reasoning.

The DeepSeek-R1-distill template keeps only what follows ``</think>`` in every assistant turn
(meant for earlier turns of a conversation) and pre-fills ``<think>`` in the generation prompt.
TRL renders the trained turn through the template too, so the trained target would lose its
reasoning. For such a template (``template_rewrites_reasoning``) the training stages render the
prompt themselves and pass the completion as text (``text_pair``).
"""
from __future__ import annotations

_REASONING_PROBE = "<think>\nreasoning to keep\n</think>\nanswer"


def template_rewrites_reasoning(tok, kwargs: dict | None = None) -> bool:
    """Whether the tokenizer's chat template (with ``kwargs``, e.g. ``enable_thinking``) changes
    an assistant turn that holds a think block."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _REASONING_PROBE}]
    try:
        return _REASONING_PROBE not in tok.apply_chat_template(probe, tokenize=False, **(kwargs or {}))
    except Exception:  # a template that cannot render this probe: leave the rows to TRL
        return False


class TextRenderer:
    """Prompt turns rendered by the template with its generation prompt (what the engine sends,
    a pre-filled ``<think>`` included); an assistant turn as text, less any opening the
    generation prompt already holds. TRL appends EOS to a text completion."""

    def __init__(self, tok, kwargs: dict | None = None):
        self.tok, self.kwargs = tok, dict(kwargs or {})
        # a BOS the template writes and the tokenizer adds again is left to the tokenizer
        ids = tok("x")["input_ids"]
        self.bos = tok.bos_token if tok.bos_token and ids[:1] == [tok.bos_token_id] else None

    def prompt(self, turns: list[dict]) -> str:
        text = self.tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False, **self.kwargs)
        return text[len(self.bos):] if self.bos and text.startswith(self.bos) else text

    @staticmethod
    def completion(prompt: str, content: str) -> str:
        overlap = next((k for k in range(min(len(prompt), len(content), 64), 0, -1) if prompt.endswith(content[:k])), 0)
        return content[overlap:]
