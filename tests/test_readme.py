"""Every ```python block of README.md runs as written.

How the blocks run
- README.md is parsed for its ```python fences; each block is one test case, with the id ``L<line>-<section>``
  (its first code line in README.md and the heading above it), so a failure names the block.
- Each block runs alone, in a fresh namespace and an empty temporary working directory: the README's blocks are
  self-contained (each imports and defines what it uses), and none relies on another having run. The code is
  compiled with its README line numbers, so a traceback points into README.md. A block that raises fails its test.
- Blocks run in this process, except those that change process-wide state, which run in a fresh interpreter
  (``python -c``; a non-zero exit fails the test with the interpreter's stderr): a block calling ``use_defaults(``
  (the program's defaults) or ``substitute(`` (registers vqdeploy under vector_quantize_pytorch's module names,
  which this process has imported for the reference checkpoint).
- ``test_blocks_use_only_names_they_define`` checks every block statically as well (``symtable``): each name a
  block reads is bound in the block (assigned, imported, a loop or ``with``/``except`` target) or is a builtin,
  on paths the run does not reach too (a ``...`` loop body, an ``except`` branch).

Preconditions the test makes, leaving the block as written
- ``reference_vq.safetensors`` (a block that loads it): vector-quantize-pytorch 1.14.17's
  ``VectorQuantize(dim=256, codebook_size=512)`` after one training forward, its ``state_dict()`` saved with
  ``safetensors.torch.save_file``; after the block, its ``vq`` must give the reference's eval indices.
- ``codec_bundle/`` (a block that reads it and exports nothing): the README says it is the bundle of the Quick
  start (``python export/codec.py``) or of the export example. The test exports a small one of the same shape
  once per module (the recipe's ``ConvCodec`` with 8 channels, 16 dims and 4 layers of 64 codes, stride 8,
  codebooks from one k-means step, as an audio bundle at 16 kHz with calibration frequencies) and copies it into
  the block's directory.
- ``audiolm_pytorch`` (the substitution block): installed by ``tests/install-downstream.sh``, part of the README's
  test command (as for ``test_downstream.py``). That script leaves out packages that ``audiolm_pytorch/__init__.py``
  imports but SoundStream does not use (fairseq, transformers, encodec, ...): the interpreter gets empty stand-ins
  for those of ``STAND_INS`` that are not installed (a finder placed after the real ones). After the block, the
  SoundStream module's ``GroupedResidualVQ`` must be vqdeploy's.
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import symtable
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SUBPROCESS_MARKERS = ("use_defaults(", "substitute(")
STAND_INS = ("fairseq", "transformers", "encodec", "wandb", "joblib", "ema_pytorch", "sklearn")


def readme_blocks(text: str) -> list[tuple[int, str, str]]:
    """(first code line, section heading, code) of every ```python block."""
    blocks, section, lines, i = [], "top", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        elif line.strip() == "```python":
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise ValueError(f"README.md:{i + 1}: a ```python block is never closed")
            blocks.append((i + 2, section, "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def _block_id(block) -> str:
    line, section, _ = block
    return f"L{line}-" + "-".join(re.findall(r"[A-Za-z0-9]+", section))


def _compiled(line: int, code: str):
    """The block compiled so that its line numbers are README.md's."""
    return compile("\n" * (line - 1) + code, str(README), "exec")


def undefined_names(code: str) -> list[str]:
    """Names the block reads that it never binds and that are not builtins."""
    top = symtable.symtable(code, "<block>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    read = set()

    def walk(table):
        for symbol in table.get_symbols():
            if symbol.is_referenced() and (table is top or symbol.is_global()):
                read.add(symbol.get_name())
        for child in table.get_children():
            walk(child)

    walk(top)
    return sorted(read - bound - set(dir(builtins)))


# ----------------------------------------------------------------------------------------------- preconditions

@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """vector-quantize-pytorch 1.14.17's VectorQuantize(dim=256, codebook_size=512) after one training forward:
    its safetensors file, the reference module (eval) and a probe input."""
    import vector_quantize_pytorch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    reference = vector_quantize_pytorch.VectorQuantize(dim=256, codebook_size=512)
    reference(torch.randn(1, 1024, 256, generator=generator))
    reference.eval()
    path = tmp_path_factory.mktemp("reference") / "reference_vq.safetensors"
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, str(path))
    return path, reference, torch.randn(2, 100, 256, generator=generator)


@pytest.fixture(scope="module")
def codec_bundle(tmp_path_factory):
    """A small audio bundle shaped like the Quick start's codec_bundle/ (stride 8, 4 residual layers, 16 kHz,
    calibration frequencies)."""
    from vqdeploy.export import export

    spec = importlib.util.spec_from_file_location("codec_recipe_for_readme", ROOT / "export" / "codec.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = recipe.ConvCodec(channels=8, dim=16, codebook_size=64, num_quantizers=4)
    model.train()
    model(recipe.synthetic_audio(4, 2048, generator))  # k-means init of the codebooks
    model.eval()
    path = tmp_path_factory.mktemp("codec") / "codec_bundle"
    export(model.quantizer, path, encoder=model.encoder, decoder=model.decoder,
           example=recipe.synthetic_audio(2, 2048, generator), calibration=recipe.synthetic_audio(4, 8000, generator),
           audio={"sample_rate": recipe.SAMPLE_RATE, "channels": 1})
    return path


def _needs_codec_bundle(code: str) -> bool:
    return '"codec_bundle/"' in code and "export(" not in code


# The interpreter's prelude for the substitution block: empty modules for STAND_INS that are not installed.
STAND_IN_PRELUDE = textwrap.dedent(f"""
    import importlib.abc, importlib.machinery, sys, types

    def _stand_in_class(name):
        return _StandInType(name, (), {{"__init__": lambda self, *args, **kwargs: None}})

    class _StandInType(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _stand_in_class(name)

    class _StandInModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _stand_in_class(name)

    class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in {STAND_INS!r}:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

        def create_module(self, spec):
            module = _StandInModule(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.append(_StandIns())
""")

SUBSTITUTION_CHECK = textwrap.dedent("""
    import sys as _sys, vqdeploy as _vqdeploy
    assert _sys.modules["audiolm_pytorch.soundstream"].GroupedResidualVQ is _vqdeploy.GroupedResidualVQ
""")


# ------------------------------------------------------------------------------------------------------- tests

def test_every_python_fence_is_a_block():
    opened = [n for n, line in enumerate(README.read_text().splitlines(), 1) if line.strip().startswith("```python")]
    assert len(BLOCKS) >= 10 and [line - 1 for line, _, _ in BLOCKS] == opened


@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_blocks_use_only_names_they_define(block):
    line, _, code = block
    undefined = undefined_names(code)
    assert not undefined, f"README.md:{line}: the block uses {undefined} but never defines or imports them"


@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_block_runs_as_written(block, tmp_path, monkeypatch, request):
    line, _, code = block
    monkeypatch.chdir(tmp_path)
    reference = None
    if "reference_vq.safetensors" in code:
        path, reference, probe = request.getfixturevalue("reference_checkpoint")
        shutil.copy(path, tmp_path / "reference_vq.safetensors")
    if _needs_codec_bundle(code):
        shutil.copytree(request.getfixturevalue("codec_bundle"), tmp_path / "codec_bundle")

    if any(marker in code for marker in SUBPROCESS_MARKERS):
        prelude, check = "", ""
        if "audiolm_pytorch" in code:  # installed by tests/install-downstream.sh, as test_downstream.py needs
            prelude, check = STAND_IN_PRELUDE, SUBSTITUTION_CHECK
        # the prelude is compiled apart, so that the block keeps its README line numbers
        padded = "\n" * (line - 1) + code
        script = (f"exec(compile({prelude!r}, '<prelude>', 'exec'))\n"
                  f"exec(compile({padded!r}, {str(README)!r}, 'exec'), {{'__name__': '__main__'}})\n"
                  f"exec(compile({check!r}, '<check>', 'exec'))\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, f"README.md:{line} failed:\n{run.stderr[-4000:]}"
        return

    namespace = {"__name__": "__main__"}
    exec(_compiled(line, code), namespace)

    if reference is not None:  # the block's vq holds the reference's codebook: the reference's indices
        vq = namespace["vq"].eval()
        assert torch.equal(vq(probe).indices, reference(probe)[1])
