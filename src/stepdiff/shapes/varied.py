"""Captions as people write them, for a (colour, shape, background) combination.

The shipped model was trained on one template, "a {color} {shape} on a {background} background". People type
articles ("an orange background"), capitals, punctuation, another word order ("on a blue background, a red
circle"), a framing ("a photo of ..."), filler ("high quality, 4k") and words the model does not know. This module
makes such captions, deterministically from a random generator, in two disjoint-enough splits: ``"train"`` (what
the text encoder is distilled on, ``tools/train_text_encoder.py``) and ``"eval"`` (what ``stepdiff eval-shapes
--varied`` measures: the everyday phrasings the issue lists, plus framings, fillers and unknown words never seen
in training).
"""

from __future__ import annotations

import numpy as np

__all__ = ["SPLITS", "varied_caption"]

SPLITS = ("train", "eval")

_FRAMES = {
    "train": ("a photo of", "a picture of", "a drawing of", "an image of", "an illustration of", "a painting of",
              "a render of", "a photograph of", "a sketch of", "an icon of", "a cartoon of", "a graphic of"),
    # The ones the issue names, and some never seen in training.
    "eval": ("a photo of", "a picture of", "a drawing of", "a digital painting of", "a poster of", "a close-up of",
             "a still of"),
}
_FILLERS = {
    "train": ("high quality", "4k", "8k", "hd", "detailed", "masterpiece", "best quality", "highly detailed",
              "trending on artstation", "sharp focus", "ultra realistic", "award winning", "studio lighting",
              "minimalist", "flat design", "vector art", "centered", "simple", "clean lines"),
    "eval": ("high quality", "4k", "uhd", "intricate details", "professional", "octane render", "cinematic",
             "masterful composition"),
}
_ADJECTIVES = {
    "train": ("big", "small", "tiny", "large", "bright", "dark", "cute", "shiny", "plain", "nice", "simple", "flat",
              "single", "lonely", "happy", "solid", "perfect", "smooth", "soft", "bold", "round", "giant"),
    "eval": ("glossy", "pretty", "lovely", "neat", "huge", "little", "vivid", "modern", "elegant", "crisp"),
}
_BACKGROUND_LINKS = {
    "train": ("on", "on", "on", "against", "with", "in front of", "over", "upon"),
    "eval": ("on", "on", "against", "in front of", "over", "atop"),
}
_ENDINGS = ("", "", "", ".", "!", " .")
_CASES = ("lower", "lower", "lower", "lower", "first", "first", "upper", "title", "random")


def _article(rng: np.random.Generator, word: str) -> str:
    """'a' or 'an' as English wants it for ``word``, or 'the', 'one' or nothing."""
    right = "an" if word[0] in "aeiou" else "a"
    pick = rng.choice([right, right, right, "the", "one", ""])
    return f"{pick} " if pick else ""


def _case(rng: np.random.Generator, text: str) -> str:
    how = rng.choice(_CASES)
    if how == "first":
        return text[:1].upper() + text[1:]
    if how == "upper":
        return text.upper()
    if how == "title":
        return text.title()
    if how == "random":
        return "".join(c.upper() if rng.random() < 0.5 else c for c in text)
    return text


def varied_caption(combo: tuple[str, str, str], rng: np.random.Generator, split: str = "train") -> str:
    """One caption that means ``combo`` = (colour, shape, background), phrased at random from ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    color, shape, background = combo
    words = f"{color} {shape}"
    if rng.random() < 0.3:
        adjective = str(rng.choice(_ADJECTIVES[split]))
        words = f"{adjective} {words}" if rng.random() < 0.7 else f"{color} {adjective} {shape}"
    subject = _article(rng, words) + words
    bg_article = _article(rng, background)
    order = rng.random()
    if order < 0.55:
        link = str(rng.choice(_BACKGROUND_LINKS[split]))
        text = f"{subject} {link} {bg_article}{background} background"
    elif order < 0.8:
        text = f"on {bg_article}{background} background, {subject}"
    elif order < 0.9:
        text = f"{subject}, {background} background"
    else:
        text = f"{background} background, {subject}"
    if rng.random() < 0.4 and text.startswith(subject):  # "a photo of" before the subject only
        text = f"{rng.choice(_FRAMES[split])} {text}"
    if rng.random() < 0.4:
        n = 1 + int(rng.integers(0, 3))
        fillers = rng.choice(_FILLERS[split], size=n, replace=False)
        text = f"{text}, {', '.join(str(f) for f in fillers)}"
    text += str(rng.choice(_ENDINGS))
    return _case(rng, text)
