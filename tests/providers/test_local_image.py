"""The local provider's development images: real PNGs of the requested size."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.provider import GenerationRequest
from pipeline.provider_errors import RejectedError
from providers.local import LocalProvider

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPT = "A lighthouse on a cliff at dusk"


def make_request(prompt: str = PROMPT, **image_settings: object) -> GenerationRequest:
    return GenerationRequest(
        job_id="job-1", content_type="image", prompt=prompt, settings=image_settings
    )


def decode(data: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(data))
    picture.load()
    return picture


@pytest.mark.parametrize(
    ("image_settings", "expected_size"),
    [
        ({}, (512, 512)),
        ({"width": 200, "height": 96}, (200, 96)),
        ({"size": "320x180"}, (320, 180)),
        ({"size": "320x180", "width": 100}, (100, 180)),
        ({"width": 64, "height": 64}, (64, 64)),
    ],
)
def test_renders_a_png_of_the_requested_size(
    image_settings: dict, expected_size: tuple[int, int]
) -> None:
    provider = LocalProvider()
    request = make_request(**image_settings)

    output = provider.start(request)

    assert output.data.startswith(PNG_SIGNATURE)
    picture = decode(output.data)
    assert picture.format == "PNG"
    assert picture.size == expected_size
    assert output.mime_type == "image/png"
    assert output.extension == "png"
    width, height = expected_size
    assert output.metadata | {"width": width, "height": height} == output.metadata
    assert output.metadata["model"] == "local-dev-image"
    assert output.usage == {"megapixels": round(width * height / 1e6, 6)}
    assert provider.estimate_usage("image", PROMPT, request.settings) == output.usage


def test_the_picture_depends_on_the_prompt_and_is_not_blank() -> None:
    provider = LocalProvider()

    first = decode(provider.start(make_request(width=128, height=128)).data).convert("RGB")
    again = decode(provider.start(make_request(width=128, height=128)).data).convert("RGB")
    other = decode(provider.start(make_request("Rain", width=128, height=128)).data)

    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.convert("RGB").tobytes()
    # A gradient with text on it: many distinct colours, not a flat fill.
    assert len(first.getcolors(maxcolors=128 * 128) or []) > 50


def test_a_very_long_prompt_still_fits_the_picture() -> None:
    output = LocalProvider().start(make_request("word " * 2000, width=96, height=64))

    assert decode(output.data).size == (96, 64)


@pytest.mark.parametrize(
    ("name", "bad_value"),
    [
        ("width", 63),
        ("width", 2049),
        ("height", 0),
        ("height", "512"),
        ("width", 100.5),
        ("height", False),
        ("size", "big"),
        ("size", "10x10"),
        ("size", "512x4096"),
        ("size", 512),
    ],
)
def test_invalid_sizes_are_rejected_at_estimate_and_start(name: str, bad_value: object) -> None:
    provider = LocalProvider()
    request = make_request(**{name: bad_value})

    with pytest.raises(RejectedError, match=name):
        provider.estimate_usage("image", PROMPT, request.settings)
    with pytest.raises(RejectedError, match=name):
        provider.start(request)
