"""Which prompt words a model's tokenizer knows as whole words."""

from __future__ import annotations

import re

__all__ = ["unknown_words"]

_SMALL_VOCABULARY = 200  # list the known words only for small closed-vocabulary models


def unknown_words(tokenizer, prompt: str, vocabulary: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(words of ``prompt`` the model does not know, the words it knows when that list is short).

    ``vocabulary`` is the model's training vocabulary where its folder records one (stepdiff.json);
    otherwise a word is known when the tokenizer has it as one whole token.
    """
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    if vocabulary is not None:
        known = sorted(set(vocabulary))
        unknown = [w for w in dict.fromkeys(words) if w not in known]
        return unknown, known if len(known) <= _SMALL_VOCABULARY else []
    vocab = tokenizer.get_vocab()
    return [w for w in dict.fromkeys(words) if f"{w}</w>" not in vocab], []
