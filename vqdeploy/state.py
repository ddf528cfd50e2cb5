"""Loading checkpoints whose keys are a subset of ours.

vqdeploy keeps a few buffers of its own (counters, init flags) and the
reference library registers some buffers lazily, so a reference checkpoint can
lack keys that a vqdeploy module has.  Modules list those keys as optional;
a missing optional key keeps the module's current value instead of failing a
strict ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn


class OptionalStateMixin(nn.Module):
    """``_optional_state`` names buffers that may be absent from a checkpoint that holds the module's other state."""

    _optional_state: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self._adapt_state_dict(state_dict, prefix)
        own_keys = [prefix + name for name in (*self._parameters, *self._buffers) if name not in self._optional_state]
        if not any(key in state_dict for key in own_keys):
            # this module is absent from the checkpoint altogether (for example a shared codebook that
            # safetensors' save_model stored under one name only): report all of it missing
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        for name in self._optional_state:
            key = prefix + name
            if key not in state_dict and name in self._buffers:
                state_dict[key] = getattr(self, name).detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _adapt_state_dict(self, state_dict: dict, prefix: str) -> None:
        """Hook for subclasses: derive our own keys from the reference's."""


def flag(value: bool) -> torch.Tensor:
    """A one-element float flag, the reference's encoding of booleans in buffers."""
    return torch.tensor([1.0 if value else 0.0])
