"""Deterministic development text built from the prompt, never from a language model."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any

from pipeline.provider import Output
from providers.local.settings import int_setting

MODEL = "local-dev-text"
MIME_TYPE = "text/plain; charset=utf-8"

# Plain words, so the output reads like prose without pretending to mean anything.
_FILLER = (
    "the", "a", "this", "that", "with", "for", "and", "of", "in", "on", "about",
    "draft", "note", "idea", "plan", "detail", "example", "outline", "point",
    "shows", "covers", "explains", "suggests", "keeps", "adds", "links", "frames",
    "clear", "simple", "useful", "early", "local", "brief", "careful", "steady",
)  # fmt: skip
_KEYWORD = re.compile(r"[^\W_]{3,}")


@dataclass(frozen=True)
class TextSettings:
    """The text settings the local provider understands."""

    max_tokens: int


def parse_settings(settings: dict[str, Any]) -> TextSettings:
    """Validate the text settings; raises RejectedError naming the bad one."""
    return TextSettings(
        max_tokens=int_setting(settings, "maxTokens", default=256, low=1, high=4000),
    )


def estimate_usage(prompt: str, settings: dict[str, Any]) -> dict[str, float]:
    """The generated text never has more words than maxTokens."""
    return {"tokens": parse_settings(settings).max_tokens}


def render(prompt: str, settings: dict[str, Any]) -> Output:
    """Build the text; the same prompt and settings always give the same bytes."""
    parsed = parse_settings(settings)
    paragraphs = _paragraphs(prompt)
    natural_length = sum(len(paragraph) for paragraph in paragraphs)
    text = _join(paragraphs, parsed.max_tokens)
    tokens = len(text.split())
    return Output(
        data=text.encode("utf-8"),
        mime_type=MIME_TYPE,
        extension="txt",
        usage={"tokens": tokens},
        metadata={
            "model": MODEL,
            "development": True,
            "note": "deterministic placeholder text from the local provider, not a model",
            "finish_reason": "length" if natural_length > parsed.max_tokens else "stop",
            "max_tokens": parsed.max_tokens,
        },
    )


def _paragraphs(prompt: str) -> list[list[str]]:
    """Words grouped in paragraphs, seeded by the prompt so reruns agree."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    rng = random.Random(seed)
    prompt_words = prompt.split()
    keywords = [word.lower() for word in _KEYWORD.findall(prompt)] or list(_FILLER)
    # Longer prompts get longer answers, as they tend to with a real model.
    target = 40 + 10 * min(len(prompt_words), 20)

    heading = ["Development", "text", "for:", *prompt_words[:12]]
    if len(prompt_words) > 12:
        heading.append("...")
    paragraphs = [heading]
    current: list[str] = []
    written = len(heading)
    while written < target:
        sentence = _sentence(rng, keywords)
        current.extend(sentence)
        written += len(sentence)
        if len(current) >= 40 or written >= target:
            paragraphs.append(current)
            current = []
    return paragraphs


def _sentence(rng: random.Random, keywords: list[str]) -> list[str]:
    length = rng.randint(6, 14)
    words = [
        rng.choice(keywords) if rng.random() < 0.4 else rng.choice(_FILLER) for _ in range(length)
    ]
    words[0] = words[0].capitalize()
    words[-1] += "."
    return words


def _join(paragraphs: list[list[str]], budget: int) -> str:
    """Join paragraphs into text, cutting off after `budget` words like a token limit."""
    kept: list[str] = []
    for paragraph in paragraphs:
        if budget <= 0:
            break
        kept.append(" ".join(paragraph[:budget]))
        budget -= len(paragraph)
    return "\n\n".join(kept) + "\n"
