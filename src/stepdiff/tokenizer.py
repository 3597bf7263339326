"""Build a real CLIP tokenizer (vocab.json + merges.txt) for a closed vocabulary, offline.

Used by the shipped shapes model and by the tiny random test models: no hub is reachable, so the
tokenizer files are trained here with the `tokenizers` BPE trainer, in CLIP's format
(`</w>` end-of-word suffix, `#version` header on merges.txt).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

__all__ = ["build_clip_tokenizer"]

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_ALPHABET = list(string.ascii_lowercase + string.digits)


def build_clip_tokenizer(words: Iterable[str], out_dir: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Train BPE merges so that every word in ``words`` is one token; save and return the tokenizer.

    Unknown words still tokenize, character by character, since every letter and digit (with and
    without the end-of-word suffix) is in the vocabulary.
    """
    words = sorted({w.lower() for w in words})
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        initial_alphabet=_ALPHABET,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(words, trainer=trainer)
    trained_vocab: dict[str, int] = bpe.get_vocab()
    merges: list[str] = _merges_of(bpe)

    vocab: dict[str, int] = {}
    for token in [_BOS, _EOS, *_ALPHABET, *(c + "</w>" for c in _ALPHABET)]:
        vocab.setdefault(token, len(vocab))
    for token, _ in sorted(trained_vocab.items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), model_max_length=model_max_length
    )
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:  # the trainer should always make whole words; fail loudly if not
            raise RuntimeError(f"word {word!r} tokenized into {len(ids)} tokens: {ids}")
    tokenizer.save_pretrained(out)
    return tokenizer


def _merges_of(bpe: Tokenizer) -> list[str]:
    state = json.loads(bpe.to_str())["model"]["merges"]
    return [" ".join(m) if isinstance(m, list) else m for m in state]
