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

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..codestream import StreamError, StreamSpec
from ..export.bundle import read_manifest
from ..progress import Progress
from .chunking import windowed

DEFAULT_CHUNK_SECONDS = 10.0


@dataclass
class CodecRun:
    """What a compress or decompress did: seconds of audio, stream bytes, bits per second, wall time."""

    seconds: float
    stream_bytes: int
    layers: int
    elapsed: float

    @property
    def kbps(self) -> float:
        return self.stream_bytes * 8 / self.seconds / 1000 if self.seconds else 0.0

    @property
    def real_time_factor(self) -> float:
        """Seconds of audio per second of wall time."""
        return self.seconds / self.elapsed if self.elapsed else math.inf


def audio_bundle(bundle: str | Path) -> tuple[dict, StreamSpec]:
    """A bundle's audio entry and stream spec; ValueError for bundles that are not audio codecs."""
    manifest = read_manifest(bundle)
    if "audio" not in manifest:
        raise ValueError(f"{bundle} is not an audio bundle: its manifest records no sample rate and channels "
                         "(export it with audio={'sample_rate': ..., 'channels': ...})")
    if "decoder" not in manifest:
        raise ValueError(f"{bundle} has no decoder graph")
    return manifest["audio"], StreamSpec.from_bundle(bundle, manifest)


def _context(audio: dict, key: str) -> tuple[int, int]:
    """The recorded context, or one chunk's worth either side for an unbounded receptive field (approximate)."""
    value = audio.get(key)
    if value is None:
        fallback = max(1, round(audio["frame_rate"]))  # one second
        return fallback, fallback
    return tuple(value)


def chunk_tokens(audio: dict, chunk_seconds: float) -> int:
    if not chunk_seconds > 0:
        raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds!r}")
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


def _session(bundle, session, provider):
    if session is not None:
        return session
    from ..runtime import Session

    return Session(bundle, provider=provider)


def compress(bundle: str | Path, source: str | Path, destination, *, layers: int | None = None,
             entropy_coding: bool = False, chunk_seconds: float = DEFAULT_CHUNK_SECONDS, session=None,
             provider: str = "cpu", progress: bool = False) -> CodecRun:
    """An audio file -> a code stream (a path, or a binary file object).  layers: how many residual layers to
    write (all by default); session: a ``vqdeploy.runtime.Session`` to reuse."""
    import soundfile

    audio, spec = audio_bundle(bundle)
    started = time.perf_counter()
    with soundfile.SoundFile(str(source)) as sound:
        if sound.samplerate != audio["sample_rate"] or sound.channels != audio["channels"]:
            raise ValueError(f"{source} has {sound.channels} channel(s) at {sound.samplerate} Hz; the bundle takes "
                             f"{audio['channels']} at {audio['sample_rate']} Hz (resample or remix it first)")
        encode = _session(bundle, session, provider).encode
        seconds = sound.frames / audio["sample_rate"]
        meter = Progress(f"compress {Path(str(source)).name}", seconds, enabled=progress)
        block = chunk_tokens(audio, chunk_seconds) * audio["hop"]
        with _open(destination, "wb") as out, spec.writer(out, layers, entropy_coding) as writer:
            with torch.no_grad():
                for indices in encode_blocks(read_audio_blocks(sound, block, audio["hop"]), encode, audio,
                                             chunk_seconds):
                    writer.write(indices)
                    meter.update(min(writer.tokens / audio["frame_rate"], seconds), "x real time")
            writer.samples = sound.frames
        meter.update(seconds, "x real time")
        meter.close()
    return CodecRun(seconds, writer.bytes_written, writer.layers, time.perf_counter() - started)


def decompress(bundle: str | Path, source, destination: str | Path, *, layers: int | None = None,
               chunk_seconds: float = DEFAULT_CHUNK_SECONDS, session=None, provider: str = "cpu",
               progress: bool = False, subtype: str | None = None) -> CodecRun:
    """A code stream (a path, or a binary file object) -> an audio file (format from its extension; subtype:
    soundfile's, e.g. "PCM_16" or "FLOAT", its default for the format otherwise).  layers: decode the first k
    layers only (any k up to the stream's).  A damaged stream still gives the audio before the damage: the file
    is written up to it, then ``StreamError`` is raised."""
    import soundfile

    audio, spec = audio_bundle(bundle)
    started = time.perf_counter()
    decode = _session(bundle, session, provider).decode
    damage: list[StreamError] = []
    with _open(source, "rb") as stream:
        reader = spec.reader(stream, layers)
        total = _size(stream)
        name = Path(str(getattr(stream, "name", "stream"))).name
        meter = Progress(f"decompress {name}", total / 1e3 if total else 0, "kB", enabled=progress)

        def frames():
            try:
                for frame in reader:
                    meter.update(reader.records.offset / 1e3, "kB/s")
                    yield frame
            except StreamError as error:  # keep what came before the damage
                damage.append(error)

        written = 0
        pending = None
        with soundfile.SoundFile(str(destination), "w", audio["sample_rate"], audio["channels"],
                                 subtype=subtype) as sound, torch.no_grad():
            for chunk in decode_blocks(frames(), decode, audio, spec.layout.frame_axis, chunk_seconds):
                if pending is not None:
                    written += _write(sound, pending, None)
                pending = chunk
            if pending is not None:  # the hop padding of the last block ends here: trim it to the sample count
                samples = reader.end["samples"] if reader.end and not damage else None
                written += _write(sound, pending, None if samples is None else samples - written)
        if not damage:
            meter.update(reader.records.offset / 1e3, "kB/s")
        meter.close()
    run = CodecRun(written / audio["sample_rate"], reader.records.offset, reader.layers, time.perf_counter() - started)
    if damage:
        error = damage[0]
        raise StreamError(f"{error.message}; the {written / audio['sample_rate']:.2f} s decoded before it were "
                          f"written to {destination}", error.offset, error.field, frames_read=reader.frames)
    return run


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


class _open:
    """A path opened for the ``with`` block, or a caller's file object passed through (left open)."""

    def __init__(self, target, mode: str):
        self.target, self.mode, self.file = target, mode, None

    def __enter__(self):
        if hasattr(self.target, "read" if "r" in self.mode else "write"):
            return self.target
        self.file = open(self.target, self.mode)
        return self.file

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
