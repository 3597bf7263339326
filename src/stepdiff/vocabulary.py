"""Which prompt words a model's tokenizer knows as whole words, and how much of a prompt it reads."""

from __future__ import annotations

import re
import threading

__all__ = ["TOKENIZER_LOCK", "prompt_tokens", "unknown_words", "unknown_words_note"]

TOKENIZER_LOCK = threading.RLock()
"""Held around every use of a tokenizer in stepdiff. A fast (Rust-backed) tokenizer sets a call's padding and
truncation on the shared object, then encodes: two threads that share a pipeline (the studio's workers) could each
encode with the other's settings (7 unpadded tokens where 77 were asked for) or get "RuntimeError: Already borrowed"
(transformers issue #47085). Tokenizing a prompt takes well under a millisecond, so one lock serves all tokenizers."""

_SMALL_VOCABULARY = 200  # list the known words only for small closed-vocabulary models
# Words in any script (CJK included), and runs of non-ASCII symbols (emoji) as words of their own;
# ASCII punctuation is not a word.
_WORD = re.compile(r"[^\W_]+|[^\w\s\x00-\x7f]+")


def _words(prompt: str) -> list[str]:
    return list(dict.fromkeys(_WORD.findall(prompt.lower())))


def unknown_words(tokenizer, prompt: str, vocabulary: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(words of ``prompt`` the model does not know, the words it knows when that list is short).

    ``vocabulary`` is the model's training vocabulary where its folder records one (stepdiff.json);
    otherwise a word is known when the tokenizer makes it one token that is not the unknown token.
    """
    words = _words(prompt)
    if vocabulary is not None:
        known = sorted(set(vocabulary))
        unknown = [w for w in words if w not in known]
        return unknown, known if len(known) <= _SMALL_VOCABULARY else []
    unk = getattr(tokenizer, "unk_token", None)
    unknown = []
    for word in words:
        with TOKENIZER_LOCK:
            tokens = tokenizer.tokenize(word)
        if len(tokens) != 1 or tokens[0] == unk:
            unknown.append(word)
    return unknown, []


def prompt_tokens(tokenizer, prompt: str) -> tuple[int, int]:
    """(tokens ``prompt`` makes with start and end, tokens the text encoder reads): a longer prompt is cut."""
    with TOKENIZER_LOCK:
        return len(tokenizer(prompt, truncation=False).input_ids), int(tokenizer.model_max_length)


def unknown_words_note(unknown: list[str], known: list[str], ignored: bool = False) -> str:
    """One line for the CLI and the studio: which words the model does not know (and, with ``ignored``, that it
    ignores them: a closed-vocabulary model trained to), and the words it knows when that list is short; "" when
    every word is known."""
    if not unknown:
        return ""
    hint = f"; it knows: {', '.join(known)}" if known else ""
    what = f" and ignores {'it' if len(unknown) == 1 else 'them'}" if ignored else ""
    return f"the model does not know {', '.join(unknown)}{what}{hint}"
