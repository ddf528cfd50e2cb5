"""Constructor arguments as data: what an export bundle stores to rebuild a quantizer without pickle.

``records_config`` wraps a class's ``__init__`` so that every instance keeps the
arguments it was built with (``init_config``); ``config_to_json`` and
``config_from_json`` turn them into JSON and back (dtypes included).  Training-only
callables (a user's optimizer factory, an activation module) cannot be stored and
are dropped: the rebuilt module is for inference.
"""

from __future__ import annotations

import functools
import inspect

import torch

TRAINING_ONLY_ARGUMENTS = ("in_place_codebook_optimizer", "straight_through_activation", "init_fn")


def records_config(cls):
    """Class decorator: instances get ``init_config``, their constructor arguments with defaults applied, and
    the release whose defaults they follow (``defaults``, see defaults.py) when they or their layers have one.
    With nested decorated classes the outermost constructor's arguments win (it finishes last)."""
    init = cls.__init__
    signature = inspect.signature(init)
    takes_defaults = "defaults" in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            else:
                arguments[name] = value
        release = next((m.defaults_release for m in self.modules() if hasattr(m, "defaults_release")), None)
        if release is not None and takes_defaults:  # rebuilt later, it must follow the same release's defaults
            arguments["defaults"] = release
        self.__dict__["init_config"] = arguments

    cls.__init__ = __init__
    return cls


def _to_json(name: str, value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return [_to_json(name, v) for v in value]
    raise TypeError(f"constructor argument {name}={value!r} cannot be stored in a bundle manifest "
                    "(only numbers, strings, booleans, None, dtypes and lists of them)")


def config_to_json(config: dict) -> tuple[dict, list[str]]:
    """(JSON-ready config, names of the training-only arguments that were dropped)."""
    stored, dropped = {}, []
    for name, value in config.items():
        if name in TRAINING_ONLY_ARGUMENTS:
            if value is not None:
                dropped.append(name)
            continue
        stored[name] = _to_json(name, value)
    return stored, dropped


def _from_json(value):
    if isinstance(value, dict):
        if set(value) != {"dtype"} or not isinstance(getattr(torch, value["dtype"], None), torch.dtype):
            raise ValueError(f"unknown value in a bundle config: {value!r}")
        return getattr(torch, value["dtype"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def config_from_json(stored: dict) -> dict:
    return {name: _from_json(value) for name, value in stored.items()}
