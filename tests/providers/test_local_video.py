"""The local provider's videos: real H.264/AAC MP4 files with the prompt spoken over them."""

from __future__ import annotations

import io
import re
import stat
import subprocess
import time
import wave
from pathlib import Path

import imageio_ffmpeg
import pytest

from pipeline.provider import GenerationRequest, Output
from pipeline.provider_errors import ProviderError, RejectedError
from providers.local import LocalProvider

PROMPT = "A lighthouse beam sweeping over the sea."
SMALL = {"width": 96, "height": 64, "fps": 6}


def make_request(prompt: str = PROMPT, **video_settings: object) -> GenerationRequest:
    return GenerationRequest(
        job_id="job-1", content_type="video", prompt=prompt, settings=video_settings
    )


def probe(output: Output, tmp_path: Path) -> str:
    """Decode the whole file with the same ffmpeg binary; return what it says about it."""
    path = tmp_path / "video.mp4"
    path.write_bytes(output.data)
    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def soundtrack_seconds(output: Output, tmp_path: Path) -> float:
    path = tmp_path / "video.mp4"
    path.write_bytes(output.data)
    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(path), "-map", "0:a", "-f", "wav", "-"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    with wave.open(io.BytesIO(result.stdout), "rb") as wav:
        # ffmpeg streams the WAV, so its header's frame count is a placeholder.
        frames = (len(result.stdout) - 44) // (wav.getsampwidth() * wav.getnchannels())
        return frames / wav.getframerate()


def test_renders_an_h264_aac_mp4_of_the_requested_length(tmp_path: Path) -> None:
    provider = LocalProvider()
    request = make_request(duration=2, **SMALL)

    output = provider.start(request)

    assert output.data[4:8] == b"ftyp"
    # +faststart: the index comes before the media, so players can start streaming at once.
    assert output.data.index(b"moov") < output.data.index(b"mdat")
    report = probe(output, tmp_path)
    assert re.search(r"Stream #0:\d.*Video: h264.*yuv420p.*96x64", report)
    assert re.search(r"Stream #0:\d.*Audio: aac", report)
    duration = re.search(r"Duration: 00:00:(\d+\.\d+)", report)
    assert duration is not None
    assert float(duration[1]) == pytest.approx(2.0, abs=0.15)
    assert output.mime_type == "video/mp4"
    assert output.extension == "mp4"
    assert output.metadata | {"duration": 2, "width": 96, "height": 64, "fps": 6} == output.metadata
    assert output.usage == {"seconds": 2}
    assert provider.estimate_usage("video", PROMPT, request.settings) == output.usage


def test_defaults_are_four_seconds_of_320x240_at_12_fps(tmp_path: Path) -> None:
    output = LocalProvider().start(make_request())

    report = probe(output, tmp_path)
    assert re.search(r"Video: h264.*320x240.*12 fps", report)
    assert output.usage == {"seconds": 4}


def test_speech_longer_than_the_video_is_cut(tmp_path: Path) -> None:
    long_prompt = "This sentence is far too long to be spoken in a single second of video. " * 3
    output = LocalProvider().start(make_request(long_prompt, duration=1, **SMALL))

    assert soundtrack_seconds(output, tmp_path) == pytest.approx(1.0, abs=0.1)


def test_speech_shorter_than_the_video_is_padded_with_silence(tmp_path: Path) -> None:
    output = LocalProvider().start(make_request("Hi.", duration=3, **SMALL))

    assert soundtrack_seconds(output, tmp_path) == pytest.approx(3.0, abs=0.1)


def test_a_blank_prompt_gives_a_silent_soundtrack(tmp_path: Path) -> None:
    output = LocalProvider().start(make_request("", duration=1, **SMALL))

    assert re.search(r"Audio: aac", probe(output, tmp_path))
    assert soundtrack_seconds(output, tmp_path) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize(
    ("name", "bad_value"),
    [
        ("duration", 0),
        ("duration", 31),
        ("duration", "4"),
        ("width", 65),
        ("width", 1282),
        ("height", 62),
        ("fps", 0),
        ("fps", 31),
        ("fps", 2.5),
        ("voice", "no-such-voice"),
    ],
)
def test_invalid_settings_are_rejected_at_estimate_and_start(name: str, bad_value: object) -> None:
    provider = LocalProvider()
    request = make_request(**{name: bad_value})

    with pytest.raises(RejectedError, match=name):
        provider.estimate_usage("video", PROMPT, request.settings)
    with pytest.raises(RejectedError, match=name):
        provider.start(request)


def fake_ffmpeg(tmp_path: Path, script: str) -> str:
    path = tmp_path / "ffmpeg"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_an_ffmpeg_failure_is_a_provider_error_with_its_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = 'echo "Unknown encoder libx264" >&2; echo "Conversion failed!" >&2; exit 1'
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", fake_ffmpeg(tmp_path, script))

    with pytest.raises(ProviderError, match="Conversion failed!") as caught:
        LocalProvider().start(make_request(duration=1, **SMALL))

    assert not isinstance(caught.value, RejectedError)
    assert "Unknown encoder libx264" in caught.value.message
    assert caught.value.provider == "local"


def test_a_stuck_ffmpeg_is_killed_at_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", fake_ffmpeg(tmp_path, "exec sleep 60"))
    began = time.monotonic()

    with pytest.raises(ProviderError, match="did not finish"):
        LocalProvider(video_timeout_s=0.5).start(make_request(duration=10, **SMALL))

    assert time.monotonic() - began < 5
