"""Every usage unit an adapter reports has a price in the one price table (pipeline/prices.json)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from providers.comfyui import ComfyUIProvider
from providers.elevenlabs import ElevenLabsProvider
from providers.heygen import HeyGenProvider
from providers.openai import OpenAIProvider
from providers.runway import RunwayProvider
from providers.stability import StabilityProvider

TABLE = json.loads((Path(__file__).parents[2] / "pipeline" / "prices.json").read_text())
PRICES = {name: entry["pricing"] for name, entry in TABLE.items() if not name.startswith("_")}
SMOKE = {"1": {"class_type": "SaveImage", "inputs": {}}}
IMAGE = "https://example.com/a.png"
REFERENCE = [{"uri": IMAGE}]

# (provider, content type, settings) covering each unit the adapters can report.
CASES = [
    (OpenAIProvider(), "text", {}),
    (OpenAIProvider(), "image", {"quality": "high", "size": "auto"}),
    (OpenAIProvider(), "audio", {}),
    (OpenAIProvider(), "audio", {"model": "tts-1-hd"}),
    (OpenAIProvider(), "video", {}),
    (OpenAIProvider(), "video", {"model": "sora-2-pro"}),
    (OpenAIProvider(), "video", {"model": "sora-2-pro", "size": "1792x1024"}),
    *[
        (StabilityProvider(), "image", {"model": m})
        for m in ("core", "ultra", "sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium")
    ],
    (ElevenLabsProvider(), "audio", {"modelId": "eleven_flash_v2_5"}),
    (RunwayProvider(), "video", {}),
    (RunwayProvider(), "video", {"model": "gen4_turbo", "promptImage": IMAGE}),
    (RunwayProvider(), "video", {"model": "veo3.1"}),
    (RunwayProvider(), "video", {"model": "veo3.1_fast", "duration": 4}),
    (RunwayProvider(), "image", {"ratio": "1280:720"}),
    (RunwayProvider(), "image", {"ratio": "1920:1080"}),
    (RunwayProvider(), "image", {"model": "gen4_image_turbo", "referenceImages": REFERENCE}),
    (HeyGenProvider(), "video", {}),
    (HeyGenProvider(), "video", {"avatarType": "talking_photo"}),
    (ComfyUIProvider(["http://unused"]), "image", {}),
    (ComfyUIProvider(["http://unused"]), "video", {"workflow": SMOKE}),
    (ComfyUIProvider(["http://unused"]), "audio", {"workflow": SMOKE}),
]


@pytest.mark.parametrize(("provider", "content_type", "settings"), CASES)
def test_every_reported_unit_is_priced(provider, content_type, settings):
    # An unpriced unit would fail the job at settle, after the provider did the work.
    usage = provider.estimate_usage(content_type, "a short prompt", settings)
    priced = PRICES[provider.name][content_type]
    assert set(usage) <= set(priced), f"{provider.name} {content_type}: {usage}"


def test_prices_are_exact_decimals_with_a_source():
    for name, entry in TABLE.items():
        if name.startswith("_"):
            continue
        assert entry["config"]["source"], name
        for content_type, units in entry["pricing"].items():
            assert all(Decimal(price) >= 0 for price in units.values()), (name, content_type)
