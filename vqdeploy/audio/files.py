"""Audio files to code streams and back, through an audio bundle, in bounded memory.

    from vqdeploy.audio import compress, decompress
    compress("codec_bundle/", "talk.wav", "talk.vqc", layers=2, entropy_coding=True)
    decompress("codec_bundle/", "talk.vqc", "talk.out.wav")

Audio is read and written with soundfile (libsndfile: WAV, FLAC, OGG and more) a chunk at a time; each chunk runs
through the bundle's graphs with the context its manifest records, and its frames go to the stream as they are
made.  The file's sample rate and channel count must be the bundle's: vqdeploy does not resample (resample with
a tool of your choice first, e.g. ``sox in.wav -r 16000 out.wav``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..codestream import StreamError, StreamSpec
from ..outputs import AtomicOutput, check_output
from ..progress import Progress
from ..runtime import OpenedBundle, Session
from .chunking import windowed

DEFAULT_CHUNK_SECONDS = 10.0
MAX_CHUNK_SECONDS = 3600.0  # a chunk is held in memory whole: an hour of 48 kHz stereo is 1.4 GB of samples


@dataclass
class CodecRun:
    """What a compress or decompress did: seconds of audio, stream bytes, layers, and the wall time of the
    whole call (opening the bundle's sessions included)."""

    seconds: float
    stream_bytes: int
    layers: int
    elapsed: float

    @property
    def kbps(self) -> float:
        """Stream bytes (header and records included) per second of audio, in kbit/s."""
        return self.stream_bytes * 8 / self.seconds / 1000 if self.seconds else 0.0

    @property
    def real_time_factor(self) -> float:
        """The one speed figure: seconds of audio per second of the call's wall time (loading included; the
        progress bar reports the same ratio so far)."""
        return self.seconds / self.elapsed if self.elapsed else math.inf


def audio_bundle(bundle: str | Path | OpenedBundle) -> tuple[OpenedBundle, dict, StreamSpec]:
    """A bundle opened (once: an ``OpenedBundle`` passes through), its audio entry and stream spec; ValueError for
    bundles that are not audio codecs."""
    bundle = OpenedBundle.open(bundle)
    if "audio" not in bundle.manifest:
        raise ValueError(f"{bundle.path} is not an audio bundle: its manifest records no sample rate and channels "
                         "(export it with audio={'sample_rate': ..., 'channels': ...})")
    if "decoder" not in bundle.manifest:
        raise ValueError(f"{bundle.path} has no decoder graph")
    return bundle, bundle.manifest["audio"], bundle.spec  # read_manifest checked the audio entry


def _context(audio: dict, key: str) -> tuple[int, int]:
    """The recorded context, or one chunk's worth either side for an unbounded receptive field (approximate)."""
    value = audio.get(key)
    if value is None:
        fallback = max(1, round(audio["frame_rate"]))  # one second
        return fallback, fallback
    return tuple(value)


def chunk_tokens(audio: dict, chunk_seconds: float) -> int:
    if isinstance(chunk_seconds, bool) or not isinstance(chunk_seconds, (int, float)) \
            or not 0 < chunk_seconds <= MAX_CHUNK_SECONDS:
        raise ValueError(f"chunk_seconds must be a number of seconds in (0, {MAX_CHUNK_SECONDS:g}], got "
                         f"{chunk_seconds!r}")
    return max(1, round(chunk_seconds * audio["frame_rate"]))


def encode_blocks(blocks: Iterator[torch.Tensor], encode: Callable, audio: dict,
                  chunk_seconds: float = DEFAULT_CHUNK_SECONDS) -> Iterator[torch.Tensor]:
    """Waveform blocks (1, channels, samples), each a whole number of hops -> index chunks, as whole-input
    encoding of their concatenation gives them."""
    return windowed(blocks, encode, in_axis=-1, out_axis=1, in_step=audio["hop"], out_step=1,
                    chunk=chunk_tokens(audio, chunk_seconds), context=_context(audio, "encoder_context"))


def decode_blocks(blocks: Iterator[torch.Tensor], decode: Callable, audio: dict, frame_axis: int,
                  chunk_seconds: float = DEFAULT_CHUNK_SECONDS) -> Iterator[torch.Tensor]:
    """Index blocks -> waveform chunks (1, channels, samples), as whole-input decoding gives them."""
    return windowed(blocks, decode, in_axis=frame_axis, out_axis=-1, in_step=1, out_step=audio["hop"],
                    chunk=chunk_tokens(audio, chunk_seconds), context=_context(audio, "decoder_context"))


def read_audio_blocks(sound_file, block_samples: int, hop: int) -> Iterator[torch.Tensor]:
    """(1, channels, samples) float32 blocks of an open soundfile.SoundFile; the last zero-padded to a hop."""
    while True:
        data = sound_file.read(block_samples, dtype="float32", always_2d=True)
        if not len(data):
            return
        block = torch.from_numpy(np.ascontiguousarray(data.T)).unsqueeze(0)
        if block.shape[-1] % hop:
            block = torch.nn.functional.pad(block, (0, hop - block.shape[-1] % hop))
        yield block


def compress(bundle: str | Path | OpenedBundle, source: str | Path, destination, *, layers: int | None = None,
             entropy_coding: bool = False, chunk_seconds: float = DEFAULT_CHUNK_SECONDS, session=None,
             provider: str = "cpu", progress: bool = False) -> CodecRun:
    """An audio file -> a code stream (a path, or a binary file object).  layers: how many residual layers to
    write (all by default); session: a ``vqdeploy.runtime.Session`` to reuse.  A path is written only when the
    whole stream is: to a temporary file beside it, renamed into place at the end (never over the input)."""
    started = time.perf_counter()
    bundle, audio, spec = audio_bundle(bundle)
    chunk_tokens(audio, chunk_seconds)
    if isinstance(destination, (str, Path)):
        destination = check_output(destination, [source, *_bundle_files(bundle.path)], "output stream")
    with _open_audio(source) as sound, _Output(destination, "wb") as out:
        if sound.samplerate != audio["sample_rate"] or sound.channels != audio["channels"]:
            raise ValueError(f"{source} has {sound.channels} channel(s) at {sound.samplerate} Hz; the bundle takes "
                             f"{audio['channels']} at {audio['sample_rate']} Hz (resample or remix it first)")
        encode = (Session(bundle, provider=provider) if session is None else session).encode
        seconds = sound.frames / audio["sample_rate"]
        meter = Progress(f"compress {Path(str(source)).name}", seconds, enabled=progress, started=started)
        block = chunk_tokens(audio, chunk_seconds) * audio["hop"]
        with spec.writer(out.file, layers, entropy_coding) as writer:
            with torch.no_grad():
                for indices in encode_blocks(read_audio_blocks(sound, block, audio["hop"]), encode, audio,
                                             chunk_seconds):
                    writer.write(indices)
                    meter.update(min(writer.tokens / audio["frame_rate"], seconds), "x real time")
            writer.samples = sound.frames
        out.commit()
        meter.update(seconds, "x real time")
        meter.close()
    return CodecRun(seconds, writer.bytes_written, writer.layers, time.perf_counter() - started)


def decompress(bundle: str | Path | OpenedBundle, source, destination: str | Path, *, layers: int | None = None,
               chunk_seconds: float = DEFAULT_CHUNK_SECONDS, session=None, provider: str = "cpu",
               progress: bool = False, subtype: str | None = None, keep_partial: bool = False) -> CodecRun:
    """A code stream (a path, or a binary file object) -> an audio file (format from its extension; subtype:
    soundfile's, e.g. "PCM_16" or "FLOAT", its default for the format otherwise).  layers: decode the first k
    layers only (any k up to the stream's).  The file is written to a temporary file beside it and renamed into
    place when the whole stream has decoded.  A damaged stream raises ``StreamError``; with ``keep_partial`` the
    audio decoded before the damage is renamed into place first (the error says how many seconds)."""
    import soundfile

    started = time.perf_counter()
    bundle, audio, spec = audio_bundle(bundle)
    chunk_tokens(audio, chunk_seconds)
    inputs = _bundle_files(bundle.path) + ([source] if isinstance(source, (str, Path)) else [])
    destination = check_output(destination, inputs, "output audio file")
    file_format = _audio_format(destination, subtype)
    if not hasattr(source, "read"):
        _existing_file(source, "input stream")
    decode = (Session(bundle, provider=provider) if session is None else session).decode
    damage: list[StreamError] = []
    with (contextlib.nullcontext(source) if hasattr(source, "read") else open(source, "rb")) as stream, \
            AtomicOutput(destination) as out:
        reader = spec.reader(stream, layers)
        total = _size(stream)
        name = Path(str(getattr(stream, "name", "stream"))).name
        meter = Progress(f"decompress {name}", total / 1e3 if total else 0, "kB", enabled=progress, started=started)

        def frames():
            try:
                for frame in reader:
                    if frame.shape[0] != 1:
                        raise StreamError(f"the stream holds a batch of {frame.shape[0]} items; an audio file "
                                          "holds one (decode a batch in Python: StreamSpec.reader and "
                                          "Session.decode, item by item)", reader.records.offset, "frame shape")
                    meter.update(reader.records.offset / 1e3, "kB/s")
                    yield frame
            except StreamError as error:  # keep what came before the damage
                damage.append(error)

        written = 0
        pending = None
        with soundfile.SoundFile(str(out.temporary), "w", audio["sample_rate"], audio["channels"],
                                 subtype=subtype, format=file_format) as sound, torch.no_grad():
            for chunk in decode_blocks(frames(), decode, audio, spec.layout.frame_axis, chunk_seconds):
                if pending is not None:
                    written += _write(sound, pending, None)
                pending = chunk
            if pending is not None:  # the hop padding of the last block ends here: trim it to the sample count
                samples = reader.end["samples"] if reader.end and not damage else None
                written += _write(sound, pending, None if samples is None else samples - written)
        seconds = written / audio["sample_rate"]
        if damage:
            error = damage[0]
            if keep_partial:
                out.commit()
            kept = f"the {seconds:.2f} s decoded before it were written to {destination}" if keep_partial else \
                f"nothing was written to {destination} (keep_partial keeps the {seconds:.2f} s decoded before it)"
            raise StreamError(f"{error.message}; {kept}", error.offset, error.field, frames_read=reader.frames)
        out.commit()
        meter.update(reader.records.offset / 1e3, "kB/s")
        meter.close()
    return CodecRun(seconds, reader.records.offset, reader.layers, time.perf_counter() - started)


def _bundle_files(bundle: Path) -> list[Path]:
    """The bundle's files: inputs that no output may overwrite."""
    return [path for path in bundle.iterdir() if path.is_file()]


def _audio_format(destination: Path, subtype: str | None) -> str:
    """soundfile's format for the destination's extension, checked with the subtype before any work."""
    import soundfile

    extension = destination.suffix[1:].upper()
    formats = soundfile.available_formats()
    if extension not in formats or extension == "RAW":
        known = ", ".join(f".{f.lower()}" for f in ("WAV", "FLAC", "OGG", "AIFF", "W64", "RF64", "CAF"))
        raise ValueError(f"cannot tell an audio format from the output name {destination.name!r}: end it in an "
                         f"audio file extension ({known}, ...)")
    if subtype is not None and not soundfile.check_format(extension, subtype):
        supported = ", ".join(soundfile.available_subtypes(extension))
        raise ValueError(f"subtype {subtype!r} does not fit the {extension} format; it takes {supported}")
    return extension


def _open_audio(source):
    """An audio file opened for reading (a SoundFile: its own context manager), with errors that name it
    (soundfile says 'System error.')."""
    import soundfile

    if isinstance(source, (str, Path)):
        _existing_file(source, "input audio file")
    try:
        return soundfile.SoundFile(source if hasattr(source, "read") else str(source))
    except (RuntimeError, TypeError) as error:  # soundfile's LibsndfileError is a RuntimeError
        raise ValueError(f"{source} cannot be read as audio: {error}") from None


def _write(sound, chunk: torch.Tensor, limit: int | None) -> int:
    data = chunk[0].detach().cpu().float().clamp(-1, 1).numpy().T
    if limit is not None:
        data = data[:max(limit, 0)]
    sound.write(data)
    return len(data)


def _size(stream) -> int:
    try:
        position = stream.tell()
        size = stream.seek(0, 2)
        stream.seek(position)
        return size
    except (OSError, AttributeError, ValueError):
        return 0


def _existing_file(path: str | Path, what: str) -> None:
    """ValueError naming ``path`` unless it is an existing file (soundfile would only say 'System error.')."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"the {what} {path} {'is not a file' if path.exists() else 'does not exist'}")


class _Output:
    """A binary output for the ``with`` block: a path is written through ``AtomicOutput`` (``commit`` renames it
    into place), a caller's file object is passed through (left open)."""

    def __init__(self, target, mode: str):
        self.target, self.mode = target, mode
        self.file, self.atomic = None, None

    def __enter__(self) -> _Output:
        if hasattr(self.target, "write"):
            self.file = self.target
            return self
        self.atomic = AtomicOutput(self.target).__enter__()
        self.file = open(self.atomic.temporary, self.mode)
        return self

    def commit(self) -> None:
        if self.atomic is not None:
            self.file.close()
            self.atomic.commit()

    def __exit__(self, *exc) -> None:
        if self.atomic is not None:
            self.file.close()
            self.atomic.__exit__(*exc)
