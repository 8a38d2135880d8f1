"""Text to speech behind a small interface, and the feeder that streams speech into an utterance.

:class:`TextToSpeech` is what the server needs from a TTS engine: ``synthesize(text)`` yields PCM
chunks (one per sentence) as they are ready. :class:`EspeakNg` is the one we ship (Debian package
``espeak-ng``, installed by ``scripts/tts.sh install``): one subprocess per sentence, an argument
list (never a shell), a minimal environment, the text on stdin, a timeout.

:class:`SpeechFeeder` is one utterance's producer thread: PCM blocks and texts are queued in order
(bounded) and pushed into the :class:`~latentsync.serving.speech_stream.Utterance`; texts are
synthesised sentence by sentence, so the first sentence is on air while the rest is synthesised.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from latentsync.serving.tasks.speech_audio import SpeechError
from latentsync.serving.tasks.task import FINAL_STATES
from latentsync.serving.tasks.utterance import Utterance

logger = logging.getLogger(__name__)

#: Longest sentence handed to the TTS at once, in characters: longer runs without punctuation are
#: cut at a space so the first audio is never far away.
MAX_SENTENCE_CHARS = 200
#: Environment espeak-ng runs with: nothing of the server's (tokens, keys) leaks into it.
ESPEAK_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

_SENTENCE_END = re.compile(r"(?<=[.!?;:。！？])\s+|\n+")


def split_sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """Cut text into sentences (at ``. ! ? ; :`` followed by space, and at newlines), none longer than ``max_chars``."""
    out: list[str] = []
    for part in _SENTENCE_END.split(text):
        part = " ".join(part.split())
        while len(part) > max_chars:
            cut = part.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(part[:cut])
            part = part[cut:].strip()
        if part:
            out.append(part)
    return out


class TextToSpeech(Protocol):
    """A TTS engine.

    Attributes:
        sample_rate_hz: Rate of the chunks :meth:`synthesize` yields, in Hz.
    """

    sample_rate_hz: int

    def voices(self) -> frozenset[str]:
        """Voice names :meth:`synthesize` accepts."""
        ...

    def synthesize(
        self, text: str, voice: str | None = None, rate_wpm: int | None = None
    ) -> Iterator[npt.NDArray[np.int16]]:
        """Speak ``text``: yields ``(n,) int16`` mono PCM chunks at :attr:`sample_rate_hz`, in order.

        Raises:
            SpeechError: ``unknown_voice``; ``tts_failed`` when the engine fails or times out.
        """
        ...


class EspeakNg:
    """espeak-ng as a subprocess, one sentence at a time.

    Args:
        default_voice: Voice when a request names none (``speech_stream.tts_voice``).
        default_rate_wpm: Words per minute when a request names none (``speech_stream.tts_rate_wpm``).
        timeout_s: Seconds one sentence may take (``speech_stream.tts_timeout_s``).
        executable: The program (default: ``espeak-ng`` on ``PATH``).

    Raises:
        RuntimeError: If espeak-ng is not installed (``scripts/tts.sh install``).
    """

    #: espeak-ng writes 22050 Hz mono 16-bit WAV to stdout.
    sample_rate_hz = 22050

    def __init__(
        self,
        default_voice: str = "en",
        default_rate_wpm: int = 175,
        timeout_s: float = 10.0,
        executable: str | None = None,
    ):
        path = executable or shutil.which("espeak-ng", path=ESPEAK_ENV["PATH"])
        if path is None:
            raise RuntimeError("espeak-ng is not installed: run scripts/tts.sh install (apt-get install espeak-ng)")
        self._exe = path
        self.default_voice = default_voice
        self.default_rate_wpm = default_rate_wpm
        self.timeout_s = timeout_s
        self._voices: frozenset[str] | None = None

    def voices(self) -> frozenset[str]:
        """Language codes and voice files of ``espeak-ng --voices`` (e.g. ``en``, ``en-us``, ``gmw/en-US``)."""
        if self._voices is None:
            out = subprocess.run(
                [self._exe, "--voices"],
                capture_output=True,
                env=ESPEAK_ENV,
                timeout=self.timeout_s,
                check=True,
                stdin=subprocess.DEVNULL,
            ).stdout.decode("utf-8", "replace")
            names: set[str] = set()
            for line in out.splitlines()[1:]:
                cols = line.split()
                if len(cols) >= 5:
                    names.update({cols[1].lower(), cols[4].lower(), cols[4].rsplit("/", 1)[-1].lower()})
            self._voices = frozenset(names)
        return self._voices

    def check_voice(self, voice: str | None) -> str:
        """The voice to use.

        Raises:
            SpeechError: ``unknown_voice`` (400) if espeak-ng has no such voice.
        """
        name = (voice or self.default_voice).strip().lower()
        if name not in self.voices():
            raise SpeechError("unknown_voice", f"voice {voice!r} does not exist (espeak-ng --voices lists them)")
        return name

    def synthesize(
        self, text: str, voice: str | None = None, rate_wpm: int | None = None
    ) -> Iterator[npt.NDArray[np.int16]]:
        """Speak ``text`` sentence by sentence: one ``(n,) int16`` chunk at 22050 Hz per sentence.

        Raises:
            SpeechError: ``unknown_voice``; ``tts_failed`` if espeak-ng exits non-zero, writes
                no WAV or takes longer than ``timeout_s``.
        """
        name = self.check_voice(voice)
        rate = int(rate_wpm or self.default_rate_wpm)
        for sentence in split_sentences(text):
            yield self._speak(sentence, name, rate)

    def _speak(self, sentence: str, voice: str, rate_wpm: int) -> npt.NDArray[np.int16]:
        args = [self._exe, "--stdout", "-b", "1", "-v", voice, "-s", str(rate_wpm)]
        try:
            done = subprocess.run(
                args,
                input=sentence.encode("utf-8"),
                capture_output=True,
                env=ESPEAK_ENV,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SpeechError("tts_failed", f"espeak-ng took longer than {self.timeout_s:g} s for a sentence") from None
        wav = done.stdout
        at = wav.find(b"data", 12, 200)
        if done.returncode != 0 or not wav.startswith(b"RIFF") or at < 0:
            err = done.stderr.decode("utf-8", "replace").strip()[:200]
            raise SpeechError("tts_failed", f"espeak-ng failed (exit {done.returncode}): {err}")
        body = wav[at + 8 :]
        return np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2").astype(np.int16)


#: One item of a feeder's queue: ``("pcm", (n,) float32 mono, rate_hz)``, ``("text", text, (voice, rate_wpm))``
#: or ``("end", None, None)``.
_Item = tuple[str, Any, Any]


def _item_bytes(item: _Item) -> int:
    """Bytes one feeder item holds: PCM samples, a text's UTF-8, nothing for the end."""
    kind, value, _ = item
    if kind == "pcm":
        return int(value.nbytes)
    if kind == "text":
        return len(value.encode("utf-8", errors="replace"))
    return 0


class SpeechFeeder:
    """One utterance's producer thread: PCM blocks, texts and the end, pushed in order (a :class:`Source`).

    Attached to its utterance when built, so cancelling the task closes it (its queue is emptied).

    Args:
        utterance: Where the speech goes.
        tts: The TTS engine for texts (None: texts are refused).
        on_error: Called with ``(code, message)`` from the feeder thread when an item fails; a
            ``buffer_full``, ``too_long`` or ``tts_failed`` cancels the utterance.
        cancel: Cancels the utterance's task (``TaskManager.cancel``).
        max_items: Items (PCM blocks, texts) that may wait (``speech_stream.max_feeder_items``).
        max_bytes: Their bytes in all (PCM as float32, texts as UTF-8; ``speech_stream.max_feeder_bytes``).
        wait_room_s: How long a text's sentence may wait for room in the buffer (synthesis runs
            faster than real time; it waits for playback to catch up).
    """

    def __init__(
        self,
        utterance: Utterance,
        tts: TextToSpeech | None,
        *,
        on_error: Callable[[str, str], None],
        cancel: Callable[[str], object],
        max_items: int,
        max_bytes: int = 32 << 20,
        wait_room_s: float = 120.0,
    ):
        self.utterance = utterance
        self._tts = tts
        self._on_error = on_error
        self._cancel = cancel
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._bytes = 0  # of the items waiting
        self._bytes_lock = threading.Lock()
        self._wait_room_s = wait_room_s
        self._items: queue.Queue[_Item] = queue.Queue(max_items)
        self._stop = threading.Event()
        self._started = False
        self._thread = threading.Thread(target=self._run, name=f"feeder-{utterance.task_id[:8]}", daemon=True)
        utterance.attach(self)

    def start(self) -> None:
        """Start the thread. Safe to call twice (and after :meth:`close`: it then ends at once)."""
        if not self._started:
            self._started = True
            self._thread.start()

    def close(self) -> None:
        """Stop the thread; what is queued is dropped. Safe to call twice, from any thread."""
        self._stop.set()
        while True:
            try:
                self._taken(self._items.get_nowait())
            except queue.Empty:
                break
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(1.0)

    def push_pcm(self, mono: npt.NDArray[np.float32], rate_hz: int) -> None:
        """Queue ``(n,) float32`` mono samples at ``rate_hz``.

        Raises:
            SpeechError: ``buffer_full`` when ``max_items`` items already wait; ``not_open`` once closed.
        """
        self._put(("pcm", mono, rate_hz))

    def push_text(self, text: str, voice: str | None = None, rate_wpm: int | None = None) -> None:
        """Queue a text to synthesise and append (sentence by sentence).

        Raises:
            SpeechError: ``tts_unavailable``, ``buffer_full``, ``not_open``.
        """
        if self._tts is None:
            raise SpeechError("tts_unavailable", "no text-to-speech engine is installed")
        self.utterance.touch()
        self._put(("text", text, (voice, rate_wpm)))

    def end(self) -> None:
        """Queue the end: the utterance ends after everything queued before it."""
        try:
            self._items.put_nowait(("end", None, None))
        except queue.Full:  # cannot queue even the end: end now, what is queued is lost anyway
            self._stop.set()
            self.utterance.end()

    def _put(self, item: _Item) -> None:
        if self._stop.is_set():
            raise SpeechError("not_open", "the utterance is over")
        size = _item_bytes(item)
        with self._bytes_lock:
            if self._bytes + size > self._max_bytes:
                raise SpeechError(
                    "buffer_full",
                    f"{self._bytes + size} bytes would wait, more than speech_stream.max_feeder_bytes = "
                    f"{self._max_bytes}: send at real time",
                )
            try:
                self._items.put_nowait(item)
            except queue.Full:
                raise SpeechError(
                    "buffer_full",
                    f"{self._max_items} blocks already wait (speech_stream.max_feeder_items): send at real time",
                ) from None
            self._bytes += size

    def _taken(self, item: _Item) -> None:
        with self._bytes_lock:
            self._bytes -= _item_bytes(item)

    @property
    def queued_bytes(self) -> int:
        """Bytes of the items waiting for the thread."""
        return self._bytes

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    def _fail(self, exc: SpeechError) -> None:
        self._on_error(exc.code, exc.message)
        if exc.code in ("buffer_full", "too_long", "tts_failed"):
            self._stop.set()
            self._cancel(self.utterance.task_id)

    def _run(self) -> None:
        try:
            self._feed()
        finally:
            self._stop.set()  # later pushes are refused: the utterance is over

    def _over(self) -> bool:
        u = self.utterance
        return self._stop.is_set() or u.ended or u.task.state in FINAL_STATES

    def _feed(self) -> None:
        u = self.utterance
        while not self._stop.is_set():
            try:
                item = self._items.get(timeout=0.2)
            except queue.Empty:
                if self._over():
                    return
                continue
            self._taken(item)
            kind, value, extra = item
            try:
                if kind == "pcm":
                    u.push(value, extra)
                elif kind == "text":
                    voice, rate = extra
                    assert self._tts is not None
                    for pcm in self._tts.synthesize(value, voice, rate):
                        mono = pcm.astype(np.float32) / 32768.0
                        if not u.wait_for_room(mono.shape[0] / self._tts.sample_rate_hz, self._wait_room_s):
                            if self._over():
                                return
                        u.push(mono, self._tts.sample_rate_hz)
                        u.touch()
                else:
                    u.end()
                    return
            except SpeechError as exc:
                if self._over() and exc.code == "not_open":
                    return
                self._fail(exc)
            except Exception as exc:  # never let the thread die silently
                logger.exception("feeder of %s crashed", u.task_id, extra={"task_id": u.task_id})
                self._fail(SpeechError("internal", f"{type(exc).__name__}: {exc}"))
