"""Validation of the local provider's settings, shared by every content type."""

from __future__ import annotations

import re
from typing import Any

from pipeline.provider_errors import RejectedError

PROVIDER_NAME = "local"

# ASCII digits only, and few of them: int() of a huge digit string is slow or refused.
_SIZE = re.compile(r"(?P<width>[0-9]{1,5})\s*[xX]\s*(?P<height>[0-9]{1,5})")


def reject(message: str) -> RejectedError:
    """A RejectedError attributed to this provider, for the caller to raise."""
    return RejectedError(message, provider=PROVIDER_NAME)


def int_setting(
    settings: dict[str, Any],
    name: str,
    *,
    default: int,
    low: int,
    high: int,
    even: bool = False,
) -> int:
    """`settings[name]` as a whole number in low..high, or `default` when absent or None."""
    value = settings.get(name)
    if value is None:
        return default
    # bool is an int subclass, and True as a width is a client bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise reject(f"{name} must be a whole number between {low} and {high}")
    if isinstance(value, float):
        # JSON clients sometimes send 512.0; anything with a fraction is a mistake.
        if not value.is_integer():
            raise reject(f"{name} must be a whole number between {low} and {high}, got {value}")
        value = int(value)
    if not low <= value <= high:
        raise reject(f"{name} must be between {low} and {high}, got {value}")
    if even and value % 2:
        # H.264 with yuv420p subsamples chroma by two in both directions.
        raise reject(f"{name} must be an even number, got {value}")
    return value


def str_setting(settings: dict[str, Any], name: str, *, default: str, max_length: int) -> str:
    """`settings[name]` as a non-blank string of at most max_length characters."""
    value = settings.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise reject(f"{name} must be a non-empty string")
    if len(value) > max_length:
        raise reject(f"{name} must be at most {max_length} characters")
    return value.strip()


def size_setting(value: Any) -> tuple[int, int]:
    """Parse a "WxH" size string into (width, height) without range checks."""
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise reject(f'size must be a string like "512x512", got {value!r:.40}')
    return int(match["width"]), int(match["height"])
