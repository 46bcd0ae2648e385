"""Pillow drawing shared by the local image and video renderers: palettes, gradients, captions."""

from __future__ import annotations

import colorsys
import hashlib

from PIL import Image, ImageChops, ImageDraw, ImageFont

Colour = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def palette(prompt: str) -> tuple[Colour, Colour]:
    """Two colours derived from the prompt, so each prompt has its own look."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    hue = digest[0] / 255
    # A quarter to half turn apart so the two ends are clearly different colours,
    # and mid-dark so white captions stay readable on both.
    other_hue = (hue + 0.25 + digest[1] / 1020) % 1.0
    return _rgb(hue, 0.55 + digest[2] / 1275), _rgb(other_hue, 0.55 + digest[3] / 1275)


def font(size: int) -> Font:
    """Pillow's bundled font: no dependency on whatever fonts the host has installed."""
    return ImageFont.load_default(size=size)


def diagonal_gradient(size: tuple[int, int], start: Colour, end: Colour) -> Image.Image:
    """From `start` at the top left to `end` at the bottom right."""
    width, height = size
    across = _ramp([255 * x // max(width - 1, 1) for x in range(width)], width, 1, size)
    down = _ramp([255 * y // max(height - 1, 1) for y in range(height)], 1, height, size)
    mask = ImageChops.add(across, down, scale=2.0)
    return Image.composite(Image.new("RGB", size, end), Image.new("RGB", size, start), mask)


def looping_gradient(size: tuple[int, int], start: Colour, end: Colour) -> Image.Image:
    """A horizontal start-end-start band whose left and right edges match.

    Shifting it sideways with wrap-around (ImageChops.offset) gives seamless motion.
    """
    width, _ = size
    half = max(width // 2, 1)
    values = [255 * min(x, width - x) // half for x in range(width)]
    mask = _ramp([min(value, 255) for value in values], width, 1, size)
    return Image.composite(Image.new("RGB", size, end), Image.new("RGB", size, start), mask)


def caption(size: tuple[int, int], text: str, *, max_lines: int) -> Image.Image:
    """A transparent RGBA layer with `text` wrapped and centred on a dark panel."""
    width, height = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    text_font = font(max(10, min(width, height) // 14))
    margin = max(4, width // 20)
    lines = wrap(draw, text or "(empty prompt)", text_font, width - 4 * margin, max_lines)
    line_height = round(draw.textbbox((0, 0), "Ag", font=text_font)[3] * 1.3)
    # The last line needs no gap below it, only the panel's margin.
    block_height = line_height * len(lines) - (line_height - round(line_height / 1.3))
    top = max((height - block_height) // 2, margin)
    draw.rectangle(
        (margin, top - margin, width - margin, top + block_height + margin),
        fill=(0, 0, 0, 140),
    )
    for index, line in enumerate(lines):
        line_width = draw.textlength(line, font=text_font)
        x = (width - line_width) / 2
        draw.text((x, top + index * line_height), line, font=text_font, fill=(255, 255, 255, 255))
    return layer


def wrap(
    draw: ImageDraw.ImageDraw, text: str, text_font: Font, max_width: int, max_lines: int
) -> list[str]:
    """Greedy word wrap to `max_width` pixels; an ellipsis marks text that did not fit."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if draw.textlength(candidate, font=text_font) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        if len(lines) > max_lines:
            break  # long prompts would otherwise be measured word by word for nothing
        current = _fit(draw, word, text_font, max_width)
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += "..."
    return lines or [""]


def _fit(draw: ImageDraw.ImageDraw, word: str, text_font: Font, max_width: int) -> str:
    """A word wider than the image, shortened with an ellipsis rather than overflowing."""
    if draw.textlength(word, font=text_font) <= max_width:
        return word
    while len(word) > 1 and draw.textlength(word + "...", font=text_font) > max_width:
        word = word[:-1]
    return word + "..."


def _rgb(hue: float, saturation: float) -> Colour:
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, 0.6)
    return round(red * 255), round(green * 255), round(blue * 255)


def _ramp(values: list[int], width: int, height: int, size: tuple[int, int]) -> Image.Image:
    """A greyscale strip of `values` stretched to `size`."""
    strip = Image.new("L", (width, height))
    strip.putdata(values)
    return strip.resize(size, Image.Resampling.NEAREST)
