"""Development video: an H.264/AAC MP4 of the prompt over a moving gradient, read aloud."""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import ImageChops, ImageDraw

from pipeline.provider import Output
from pipeline.provider_errors import ProviderError
from providers.local import audio, drawing, espeak
from providers.local.settings import PROVIDER_NAME, int_setting

MODEL = "local-dev-video"
DEFAULT_TIMEOUT_S = 120.0
_STDERR_LINES = 8


@dataclass(frozen=True)
class VideoSettings:
    """The video settings the local provider understands."""

    duration: int  # seconds
    width: int
    height: int
    fps: int
    speech: audio.AudioSettings  # `voice` and `speed`, as for audio, for the soundtrack


def parse_settings(settings: dict[str, Any]) -> VideoSettings:
    """Validate the video settings; raises RejectedError naming the bad one."""
    return VideoSettings(
        duration=int_setting(settings, "duration", default=4, low=1, high=30),
        width=int_setting(settings, "width", default=320, low=64, high=1280, even=True),
        height=int_setting(settings, "height", default=240, low=64, high=1280, even=True),
        fps=int_setting(settings, "fps", default=12, low=1, high=30),
        speech=audio.parse_settings(settings),
    )


def estimate_usage(prompt: str, settings: dict[str, Any]) -> dict[str, float]:
    """The duration is fixed by the settings, so the estimate is exact."""
    return {"seconds": parse_settings(settings).duration}


def render(
    prompt: str, settings: dict[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Output:
    """Render frames, speak the prompt, and let ffmpeg mux both into an MP4."""
    parsed = parse_settings(settings)
    deadline = time.monotonic() + timeout_s
    soundtrack = _soundtrack(prompt, parsed)
    with tempfile.TemporaryDirectory(prefix="local-video-") as folder:
        workdir = Path(folder)
        (workdir / "soundtrack.wav").write_bytes(audio.wav_bytes(soundtrack))
        _encode(_frames(prompt, parsed), workdir, parsed, deadline - time.monotonic())
        data = (workdir / "video.mp4").read_bytes()
    return Output(
        data=data,
        mime_type="video/mp4",
        extension="mp4",
        usage={"seconds": parsed.duration},
        metadata={
            "model": MODEL,
            "development": True,
            "duration": parsed.duration,
            "width": parsed.width,
            "height": parsed.height,
            "fps": parsed.fps,
            "voice": parsed.speech.voice,
        },
    )


def _soundtrack(prompt: str, parsed: VideoSettings) -> espeak.Speech:
    """The spoken prompt, cut or padded with silence to exactly the video's length."""
    if prompt.strip():
        speech = audio.synthesize(prompt, parsed.speech)
    else:
        # Nothing to say: a silent track, at the rate eSpeak NG would have used.
        speech = espeak.Speech(samples=b"", sample_rate=22050)
    wanted = parsed.duration * speech.sample_rate * 2
    samples = speech.samples[:wanted].ljust(wanted, b"\x00")
    return espeak.Speech(samples=samples, sample_rate=speech.sample_rate)


def _frames(prompt: str, parsed: VideoSettings) -> Iterator[bytes]:
    """Raw RGB frames: the gradient slides one full loop over the video, the caption stays."""
    size = (parsed.width, parsed.height)
    start, end = drawing.palette(prompt)
    background = drawing.looping_gradient(size, start, end)
    overlay = drawing.caption(size, prompt, max_lines=max(2, parsed.height // 60))
    # Pasting only the caption's box, not a full transparent frame, keeps big frames cheap.
    box = overlay.getbbox() or (0, 0, 1, 1)
    caption = overlay.crop(box)
    counter_font = drawing.font(max(9, parsed.height // 20))
    total = parsed.duration * parsed.fps
    for index in range(total):
        frame = ImageChops.offset(background, index * parsed.width // total, 0)
        frame.paste(caption, box[:2], caption)
        _draw_progress(ImageDraw.Draw(frame), index, total, parsed, counter_font)
        yield frame.tobytes()


def _draw_progress(
    draw: ImageDraw.ImageDraw, index: int, total: int, parsed: VideoSettings, font: drawing.Font
) -> None:
    seconds = index / parsed.fps
    draw.text((6, 4), f"local dev video  {index + 1}/{total}  {seconds:4.1f}s", font=font)
    bar_height = max(2, parsed.height // 60)
    bar_width = round(parsed.width * (index + 1) / total)
    draw.rectangle((0, parsed.height - bar_height, bar_width, parsed.height), fill=(255, 255, 255))


def _encode(
    frames: Iterator[bytes], workdir: Path, parsed: VideoSettings, timeout_s: float
) -> None:
    """Pipe frames into ffmpeg and wait; ffmpeg's trouble becomes a ProviderError."""
    arguments = [
        "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{parsed.width}x{parsed.height}",
        "-r", str(parsed.fps), "-i", "pipe:0",
        "-i", str(workdir / "soundtrack.wav"),
        "-map", "0:v:0", "-map", "1:a:0",
        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "96k",
        "-t", str(parsed.duration), "-movflags", "+faststart",
        str(workdir / "video.mp4"),
    ]  # fmt: skip
    stderr_path = workdir / "ffmpeg.log"
    # stderr goes to a file: a pipe nobody reads while we write frames can fill and deadlock.
    with stderr_path.open("wb") as stderr:
        try:
            process = subprocess.Popen(
                [_ffmpeg_exe(), *arguments],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        except OSError as error:
            raise ProviderError(f"cannot start ffmpeg: {error}", provider=PROVIDER_NAME) from error
    timed_out = threading.Event()
    # A write blocked on a stuck ffmpeg has no timeout of its own; the watchdog ends it.
    watchdog = threading.Timer(max(timeout_s, 0.0), _kill, (process, timed_out))
    watchdog.start()
    try:
        _feed(process, frames)
        process.wait(timeout=max(timeout_s, 0.0) + 5)  # the watchdog fires first; a backstop
    except subprocess.TimeoutExpired:
        _kill(process, timed_out)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
        process.wait()
    if timed_out.is_set():
        message = f"ffmpeg did not finish within {timeout_s:.0f}s"
        raise ProviderError(message, provider=PROVIDER_NAME)
    if process.returncode != 0:
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-_STDERR_LINES:]
        raise ProviderError(
            f"ffmpeg failed with exit status {process.returncode}: "
            + (" | ".join(tail) or "no output"),
            provider=PROVIDER_NAME,
        )


def _ffmpeg_exe() -> str:
    """The ffmpeg binary shipped in the imageio-ffmpeg wheel."""
    import imageio_ffmpeg

    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as error:  # raised when the wheel has no binary for this platform
        raise ProviderError(f"no ffmpeg binary: {error}", provider=PROVIDER_NAME) from error


def _feed(process: subprocess.Popen[bytes], frames: Iterator[bytes]) -> None:
    stdin = process.stdin  # never None: Popen was given stdin=PIPE
    try:
        for frame in frames:
            stdin.write(frame)  # type: ignore[union-attr]
        stdin.close()  # type: ignore[union-attr]
    except (BrokenPipeError, ValueError):
        pass  # ffmpeg stopped reading; its exit status and stderr say why


def _kill(process: subprocess.Popen[bytes], timed_out: threading.Event) -> None:
    timed_out.set()
    process.kill()
