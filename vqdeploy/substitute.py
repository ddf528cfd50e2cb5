"""Run code written for vector-quantize-pytorch on vqdeploy, without editing it.

Packages such as audiolm-pytorch and meshgpt-pytorch do ``from vector_quantize_pytorch import ResidualVQ``.
``substitute()`` registers a module under that name (and under the reference's submodule names) whose classes
are vqdeploy's, so such imports get vqdeploy's quantizers.  It must run before the package is imported:
``from x import Y`` binds the class at import time, so a package that already holds the reference's classes
keeps them, and ``substitute()`` says so instead of half-substituting.

    import vqdeploy.substitute
    vqdeploy.substitute.substitute()            # 1.32.0's defaults, as `pip install vector-quantize-pytorch` today
    from audiolm_pytorch import SoundStream     # its GroupedResidualVQ is vqdeploy's

or, for a program as it is::

    python -m vqdeploy.substitute [--defaults 1.14.17] train.py --its --own --arguments
    python -m vqdeploy.substitute [--defaults 1.14.17] -m package.module --its --arguments

``defaults="1.14.17"`` makes 1.14.17's defaults the program's (as ``vqdeploy.use_defaults``) for models
trained with that release.  Names of the reference that vqdeploy does not provide raise an ``ImportError``
that says so.
"""

from __future__ import annotations

import argparse
import runpy
import sys
import types

from . import defaults as _defaults
from .registry import CLASSES, load_class

REFERENCE = "vector_quantize_pytorch"

# the reference's submodules (1.14.17 to 1.32.0) -> the public names each one defines (the registry's references)
_REFERENCED = [entry for entry in CLASSES if entry.reference is not None]
SUBMODULES: dict[str, tuple[str, ...]] = {
    submodule: tuple(entry.name for entry in _REFERENCED if entry.reference == submodule)
    for submodule in dict.fromkeys(entry.reference for entry in _REFERENCED)}


class NotProvided(ImportError):
    """A name of the reference that vqdeploy does not have (an ImportError, so ``from ... import`` says why)."""


def _module(name: str, names: tuple[str, ...], provided: dict[str, object]) -> types.ModuleType:
    module = types.ModuleType(name, f"vqdeploy's stand-in for {name}")
    module.__vqdeploy_substitute__ = True
    for attribute in names:
        if attribute in provided:
            setattr(module, attribute, provided[attribute])
    missing = tuple(attribute for attribute in names if attribute not in provided)

    def __getattr__(attribute: str):
        if attribute in missing:
            raise NotProvided(f"vqdeploy does not provide {name}.{attribute} yet (see the README's list of 1.32.0 "
                              f"names it does not take); provided: {', '.join(sorted(provided))}", name=name)
        raise AttributeError(f"module {name!r} has no attribute {attribute!r}")

    module.__getattr__ = __getattr__
    module.__all__ = [attribute for attribute in names if attribute in provided]
    return module


def is_substituted() -> bool:
    """Whether ``import vector_quantize_pytorch`` gives vqdeploy's stand-in."""
    return getattr(sys.modules.get(REFERENCE), "__vqdeploy_substitute__", False)


def substitute(defaults: str | None = None) -> types.ModuleType:
    """Make ``import vector_quantize_pytorch`` (and its submodules) give vqdeploy's classes; returns the module.

    ``defaults``: ``"1.32.0"`` or ``"1.14.17"`` makes that release's defaults the program's; ``None`` keeps the
    current choice (1.32.0's unless ``VQDEPLOY_DEFAULTS`` or ``vqdeploy.use_defaults`` says otherwise).  Calling
    it again is harmless.  Raises ``RuntimeError`` if the real package was imported already.
    """
    if defaults is not None:
        _defaults.use_defaults(defaults)
    if is_substituted():
        return sys.modules[REFERENCE]
    loaded = sorted(name for name in sys.modules if name == REFERENCE or name.startswith(REFERENCE + "."))
    if loaded:
        raise RuntimeError(f"vector_quantize_pytorch is imported already ({', '.join(loaded)}): call "
                           "vqdeploy.substitute.substitute() before anything imports it, or run the program with "
                           "`python -m vqdeploy.substitute`")
    provided = {entry.name: load_class(entry.name) for entry in _REFERENCED}
    top_names = tuple(name for names in SUBMODULES.values() for name in names)
    package = _module(REFERENCE, top_names, provided)
    package.__path__ = []  # a package, so `import vector_quantize_pytorch.residual_vq` finds the entries below
    sys.modules[REFERENCE] = package
    for submodule, names in SUBMODULES.items():
        module = _module(f"{REFERENCE}.{submodule}", names, provided)
        sys.modules[module.__name__] = module
        setattr(package, submodule, module)
    return package


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vqdeploy.substitute",
        description="Run a Python program with vqdeploy's quantizers in place of vector-quantize-pytorch's.")
    parser.add_argument("--defaults", choices=_defaults.RELEASES, default=None,
                        help="whose defaults the program's quantizers take (default: 1.32.0, or VQDEPLOY_DEFAULTS)")
    parser.add_argument("-m", dest="module", help="run a module, as `python -m`")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="script path and its arguments")
    args = parser.parse_args(argv)
    if args.module is None and not args.program:
        parser.error("give a script path or -m module")
    substitute(args.defaults)
    if args.module is not None:
        sys.argv = [args.module, *args.program]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args.program)
        runpy.run_path(args.program[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
