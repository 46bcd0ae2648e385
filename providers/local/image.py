"""Development images: a PNG gradient coloured by the prompt, with the prompt drawn on it."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from pipeline.provider import Output
from providers.local import drawing
from providers.local.settings import int_setting, reject, size_setting

MODEL = "local-dev-image"
MIN_SIDE, MAX_SIDE, DEFAULT_SIDE = 64, 2048, 512


@dataclass(frozen=True)
class ImageSettings:
    """The image settings the local provider understands."""

    width: int
    height: int


def parse_settings(settings: dict[str, Any]) -> ImageSettings:
    """Validate the image settings; raises RejectedError naming the bad one.

    `size` ("WxH") sets both sides; `width` and `height`, when given, win over it.
    """
    defaults = {"width": DEFAULT_SIDE, "height": DEFAULT_SIDE}
    if settings.get("size") is not None:
        width, height = size_setting(settings["size"])
        for name, value in (("width", width), ("height", height)):
            if not MIN_SIDE <= value <= MAX_SIDE:
                raise reject(f"size {name} must be between {MIN_SIDE} and {MAX_SIDE}, got {value}")
        defaults = {"width": width, "height": height}
    return ImageSettings(
        width=int_setting(
            settings, "width", default=defaults["width"], low=MIN_SIDE, high=MAX_SIDE
        ),
        height=int_setting(
            settings, "height", default=defaults["height"], low=MIN_SIDE, high=MAX_SIDE
        ),
    )


def estimate_usage(prompt: str, settings: dict[str, Any]) -> dict[str, float]:
    """Megapixels are known before rendering, so the estimate is exact."""
    parsed = parse_settings(settings)
    return {"megapixels": _megapixels(parsed)}


def render(prompt: str, settings: dict[str, Any]) -> Output:
    """Draw the PNG; the same prompt and size always give the same picture."""
    parsed = parse_settings(settings)
    size = (parsed.width, parsed.height)
    start, end = drawing.palette(prompt)
    picture = drawing.diagonal_gradient(size, start, end)
    layer = drawing.caption(size, prompt, max_lines=max(2, parsed.height // 48))
    _label(layer)
    picture.paste(layer, (0, 0), layer)

    info = PngInfo()
    info.add_text("Software", MODEL)
    info.add_text("Comment", "development output of the local provider")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=info, optimize=False)
    return Output(
        data=buffer.getvalue(),
        mime_type="image/png",
        extension="png",
        usage={"megapixels": _megapixels(parsed)},
        metadata={
            "model": MODEL,
            "development": True,
            "width": parsed.width,
            "height": parsed.height,
        },
    )


def _label(layer: Image.Image) -> None:
    """Mark the corner so nobody mistakes a development image for a real one."""
    draw = ImageDraw.Draw(layer)
    label_font = drawing.font(max(9, min(layer.size) // 32))
    draw.text((6, 4), "local dev image", font=label_font, fill=(255, 255, 255, 200))


def _megapixels(parsed: ImageSettings) -> float:
    return round(parsed.width * parsed.height / 1e6, 6)
