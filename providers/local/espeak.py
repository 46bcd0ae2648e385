"""eSpeak NG through ctypes: one lazily initialised engine per process, used under a lock."""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from array import array
from dataclasses import dataclass

from pipeline.provider_errors import ProviderError
from providers.local.settings import PROVIDER_NAME

# Values from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # without it a missing data folder calls exit() in our process
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAMETER_RATE = 1
_EE_OK = 0

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

# The library keeps its voice, rate and callback in process-wide globals and is not
# thread-safe, so one engine per process is shared by every caller, one at a time.
_lock = threading.Lock()
_engine: _Engine | None = None


@dataclass(frozen=True)
class Speech:
    """Mono 16-bit little-endian PCM samples and their rate."""

    samples: bytes
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / 2 / self.sample_rate


def has_voice(voice: str) -> bool:
    """Whether eSpeak NG knows `voice` (a name like "en", "en-us" or "fr+f3")."""
    with _lock:
        return _get_engine().select_voice(voice)


def speak(text: str, *, voice: str, words_per_minute: int, timeout_s: float) -> Speech:
    """Synthesize `text`; raises ProviderError if the voice is unknown or it takes too long."""
    with _lock:
        engine = _get_engine()
        if not engine.select_voice(voice):
            raise ProviderError(f"eSpeak NG has no voice {voice!r}", provider=PROVIDER_NAME)
        return engine.synthesize(text, words_per_minute, deadline=time.monotonic() + timeout_s)


def _get_engine() -> _Engine:
    """The process's engine, created on first use so importing this module loads nothing."""
    global _engine  # noqa: PLW0603 - the C library itself is a process-wide singleton
    if _engine is None:
        _engine = _Engine()
    return _engine


class _Engine:
    """The loaded library, its callback, and the samples of the synthesis in progress."""

    def __init__(self) -> None:
        import espeakng_loader

        try:
            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data_path = espeakng_loader.get_data_path().encode()
        except (OSError, RuntimeError) as error:
            message = f"cannot load eSpeak NG: {error}"
            raise ProviderError(message, provider=PROVIDER_NAME) from error
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip

        sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INITIALIZE_DONT_EXIT
        )
        if sample_rate <= 0:
            raise ProviderError("eSpeak NG failed to initialise", provider=PROVIDER_NAME)
        self._lib = lib
        self.sample_rate = sample_rate
        self._chunks: list[bytes] = []
        self._deadline = 0.0
        self._timed_out = False
        # Kept on self: C holds only a raw pointer, and a collected callback would crash.
        self._callback = _SYNTH_CALLBACK(self._collect)
        lib.espeak_SetSynthCallback(self._callback)

    def select_voice(self, voice: str) -> bool:
        return self._lib.espeak_SetVoiceByName(voice.encode("utf-8", "replace")) == _EE_OK

    def synthesize(self, text: str, words_per_minute: int, *, deadline: float) -> Speech:
        self._lib.espeak_SetParameter(_PARAMETER_RATE, words_per_minute, 0)
        # A NUL would end the C string early; the prompt is plain text, never SSML.
        encoded = text.replace("\x00", " ").encode("utf-8", "replace") + b"\x00"
        self._chunks, self._deadline, self._timed_out = [], deadline, False
        try:
            status = self._lib.espeak_Synth(
                encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
            samples = b"".join(self._chunks)
        finally:
            self._chunks = []
        if self._timed_out:
            raise ProviderError("speech synthesis took too long", provider=PROVIDER_NAME)
        if status != _EE_OK:
            raise ProviderError(f"eSpeak NG failed with status {status}", provider=PROVIDER_NAME)
        return Speech(samples=_little_endian(samples), sample_rate=self.sample_rate)

    def _collect(self, wav: ctypes._Pointer, count: int, _events: int) -> int:
        if time.monotonic() > self._deadline:
            self._timed_out = True
            return 1  # tells eSpeak NG to abandon the synthesis
        if wav and count > 0:
            self._chunks.append(ctypes.string_at(wav, count * 2))
        return 0


def _little_endian(samples: bytes) -> bytes:
    """eSpeak NG writes native-endian shorts; WAV wants little-endian ones."""
    if sys.byteorder == "little":
        return samples
    swapped = array("h", samples)
    swapped.byteswap()
    return swapped.tobytes()
