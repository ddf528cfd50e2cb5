"""What a codec runtime needs to know of an audio bundle, measured at export: sample rate and channels (given),
the encoder's stride (samples per token), and how far each network sees (its receptive field), so that long
inputs can be cut into chunks whose results equal whole-input processing.

The receptive fields are read off gradients in float64: the input samples a token's features depend on (encoder)
and the tokens an output sample depends on (decoder), united over a few random inputs so that an activation
that happens to be flat somewhere does not hide a dependency.  A network that sees its whole input (a recurrent
layer, global pooling) is recorded as unbounded: chunked processing then only approximates whole-input results.
A probe whose gradient is zero everywhere (every unit on the path inactive) is skipped; if all are, the field is
recorded as unbounded too, the safe side.
"""

from __future__ import annotations

import copy
import math

import torch

from ..checks import positive_int

PROBES = 3


def audio_entry(sample_rate: int, channels: int, encoder: torch.nn.Module, decoder: torch.nn.Module | None,
                example: torch.Tensor, example_features: torch.Tensor | None) -> dict:
    """The manifest's ``audio`` entry.  example: an encoder input (batch, channels, samples);
    example_features: the decoder network's input for it (the quantizer's decode of its indices)."""
    positive_int("audio sample_rate", sample_rate)
    positive_int("audio channels", channels)
    if encoder is None:
        raise ValueError("an audio bundle wraps an encoder network (waveform -> features)")
    if example.ndim != 3 or example.shape[1] != channels:
        raise ValueError(f"an audio example must be (batch, channels={channels}, samples), got "
                         f"{tuple(example.shape)}")
    samples = example.shape[-1]
    with torch.no_grad():
        short, long = encoder(example[:1].float()), encoder(example[:1].float().repeat(1, 1, 2))
    time_axes = [a for a in range(short.ndim) if short.shape[a] != long.shape[a]]
    tokens = short.shape[time_axes[0]] if len(time_axes) == 1 else 0
    hop = samples // tokens if tokens else 0
    if tokens < 4 or hop * tokens != samples:
        raise ValueError(f"the encoder maps {samples} samples to features of shape {tuple(short.shape)}: an audio "
                         "bundle needs one time axis and an example whose length is a multiple of the encoder's "
                         "stride, at least 4 tokens long")
    entry = {"sample_rate": sample_rate, "channels": channels, "hop": hop, "frame_rate": sample_rate / hop,
             "encoder_context": encoder_context(encoder, channels, hop, time_axes[0])}
    if decoder is not None and example_features is not None:
        feature_axes = [a for a in range(example_features.ndim) if example_features.shape[a] == tokens]
        entry["decoder_context"] = decoder_context(decoder, example_features[:1], feature_axes[-1], hop)
    return entry


def _dependency(network: torch.nn.Module, shape: list[int], axis: int, pick, seed: int) -> tuple[int, int] | None:
    """The widest span [first, last] along ``axis`` of a random float64 input of ``shape`` that ``pick(output)``
    depends on, over ``PROBES`` inputs (a probe whose gradient is zero everywhere, every unit on the path
    inactive, is skipped); None when no probe sees a dependency or one reaches the input's ends (unbounded)."""
    network = copy.deepcopy(network).double().eval()
    generator = torch.Generator().manual_seed(seed)
    first, last = shape[axis], -1
    for _ in range(PROBES):
        x = torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
        target = pick(network(x))
        weights = torch.randn(target.shape, dtype=torch.float64, generator=generator)
        (gradient,) = torch.autograd.grad((target * weights).sum(), x)
        others = tuple(a for a in range(gradient.ndim) if a != axis)
        nonzero = torch.nonzero(gradient.abs().sum(dim=others) > 0).flatten()
        if nonzero.numel():
            first, last = min(first, int(nonzero.min())), max(last, int(nonzero.max()))
    if last < 0 or first == 0 or last == shape[axis] - 1:
        return None
    return first, last


def encoder_context(encoder: torch.nn.Module, channels: int, hop: int, time_axis: int,
                    tokens: int = 64) -> list[int] | None:
    """[left, right]: how many tokens of context a chunk needs either side for its tokens' features to see every
    input sample they depend on; None when unbounded."""
    token = tokens // 2
    span = _dependency(encoder, [1, channels, tokens * hop], 2, lambda y: y.movedim(time_axis, -1)[..., token], 0)
    if span is None:
        return None
    first, last = span
    return [max(0, math.ceil((token * hop - first) / hop)), max(0, math.ceil((last - (token * hop + hop - 1)) / hop))]


def decoder_context(decoder: torch.nn.Module, example_features: torch.Tensor, time_axis: int, hop: int,
                    tokens: int = 64) -> list[int] | None:
    """[left, right]: how many tokens either side of a token its output samples depend on; None when
    unbounded."""
    token = tokens // 2
    shape = list(example_features.shape)
    shape[time_axis] = tokens
    span = _dependency(decoder, shape, time_axis, lambda y: y[..., token * hop:(token + 1) * hop], 1)
    if span is None:
        return None
    first, last = span
    return [max(0, token - first), max(0, last - token)]
