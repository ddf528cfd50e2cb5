"""Every ```python block of README.md and of docs/*.md runs as written, and every relative link in them resolves.

How the blocks run
- README.md and every docs/*.md (the documents) are parsed for their ```python fences; each block is one test
  case, with the id ``<document>-L<line>-<section>`` (the document's name, its first code line there and the
  heading above it), so a failure names the block.
- Each block runs alone, in a fresh namespace and an empty temporary working directory: the documents' blocks are
  self-contained (each imports and defines what it uses), and none relies on another having run. The code is
  compiled with its document's line numbers, so a traceback points into that file. A block that raises fails its
  test.
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
- ``codec_bundle/`` (a block that reads it and exports nothing): the documents say it is the bundle of the
  README's Quick start (``python export/codec.py``) or of its export example. The test exports a small one of the
  same shape once per module (the recipe's ``ConvCodec`` with 8 channels, 16 dims and 4 layers of 64 codes,
  stride 8, codebooks from one k-means step, as an audio bundle at 16 kHz with calibration frequencies) and copies
  it into the block's directory.
- ``audiolm_pytorch`` (the substitution block): installed by ``tests/install-downstream.sh``, part of the README's
  test command (as for ``test_downstream.py``). That script leaves out packages that ``audiolm_pytorch/__init__.py``
  imports but SoundStream does not use (fairseq, transformers, encodec, ...): the interpreter gets empty stand-ins
  for those of ``STAND_INS`` that are not installed (a finder placed after the real ones). After the block, the
  SoundStream module's ``GroupedResidualVQ`` must be vqdeploy's.

Links
- ``test_relative_links_resolve`` reads every markdown link ``[text](target)`` (and image ``![alt](target)``) of
  each document outside code (fenced and indented blocks, inline code spans): a relative target must name an
  existing file or folder, relative to the document, and a ``#anchor`` (alone: the document itself) must be the
  GitHub slug of one of the target markdown file's headings. Absolute ``http(s)://`` and ``mailto:`` links are
  left alone (not fetched).
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
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
SUBPROCESS_MARKERS = ("use_defaults(", "substitute(")
STAND_INS = ("fairseq", "transformers", "encodec", "wandb", "joblib", "ema_pytorch", "sklearn")


def readme_blocks(text: str, name: str = "README.md") -> list[tuple[int, str, str]]:
    """(first code line, section heading, code) of every ```python block of a document."""
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
                raise ValueError(f"{name}:{i + 1}: a ```python block is never closed")
            blocks.append((i + 2, section, "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return blocks


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


# (document, first code line, section heading, code) of every block of every document
BLOCKS = [(path, *block) for path in DOCUMENTS for block in readme_blocks(path.read_text(), _name(path))]


def _block_id(block) -> str:
    path, line, section, _ = block
    return f"{path.stem}-L{line}-" + "-".join(re.findall(r"[A-Za-z0-9]+", section))


def _compiled(path: Path, line: int, code: str):
    """The block compiled so that its line numbers are its document's."""
    return compile("\n" * (line - 1) + code, str(path), "exec")


# ------------------------------------------------------------------------------------------------------- links

LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def prose(text: str) -> str:
    """The document without its code: fenced blocks, indented blocks (after a blank line) and inline code spans
    become blank, so that line counts stay."""
    kept, fence, indented, previous_blank = [], False, False, True
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            kept.append("")
        elif fence:
            kept.append("")
        elif line.startswith("    ") and (previous_blank or indented):
            indented = True
            kept.append("")
        else:
            indented = indented and not line.strip()
            kept.append(line)
        previous_blank = not line.strip()
    return re.sub(r"`[^`]*`", lambda span: "\n" * span.group().count("\n"), "\n".join(kept))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (markup too), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def heading_anchors(text: str) -> set[str]:
    """The anchors of a markdown file's headings outside code, repeats numbered as GitHub numbers them."""
    anchors, fence = set(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            slug = github_slug(line.lstrip("#").strip().rstrip("#").strip())
            candidate, n = slug, 0
            while candidate in anchors:
                n += 1
                candidate = f"{slug}-{n}"
            anchors.add(candidate)
    return anchors


def broken_links(path: Path) -> list[str]:
    """Every relative link of a markdown file that leads nowhere, as ``file:line: target (why)``."""
    broken, text = [], prose(path.read_text())
    for match in LINK.finditer(text):
        target = match.group(1)
        if EXTERNAL.match(target):
            continue
        line = text.count("\n", 0, match.start()) + 1
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{path}:{line}: {target} (no such file)")
        elif anchor:
            if destination.suffix != ".md" or not destination.is_file():
                broken.append(f"{path}:{line}: {target} (an anchor into a file that is not markdown)")
            elif anchor not in heading_anchors(destination.read_text()):
                broken.append(f"{path}:{line}: {target} (no heading with that anchor)")
    return broken


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
    assert len(DOCUMENTS) > 1 and len(BLOCKS) >= 10
    for path in DOCUMENTS:
        opened = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith("```python")]
        assert [line - 1 for document, line, _, _ in BLOCKS if document == path] == opened, _name(path)


@pytest.mark.parametrize("path", DOCUMENTS, ids=_name)
def test_relative_links_resolve(path):
    broken = broken_links(path)
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


def test_the_link_check_catches_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Its `code`, part 2\n\n## Its `code`, part 2\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[fine](other.md) [fine](other.md#its-code-part-2) [fine](other.md#its-code-part-2-1)\n"
                    "[fine](#page) [web](https://example.com/nothing) `[code](missing.md)`\n\n"
                    "    [indented](missing.md)\n\n```\n[fenced](missing.md)\n```\n"
                    "[gone](missing.md) [no heading](other.md#nothing) [no anchor here](#nothing)\n")
    assert [entry.split(": ", 1)[1] for entry in broken_links(page)] == [
        "missing.md (no such file)", "other.md#nothing (no heading with that anchor)",
        "#nothing (no heading with that anchor)"]


@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_blocks_use_only_names_they_define(block):
    path, line, _, code = block
    undefined = undefined_names(code)
    assert not undefined, f"{_name(path)}:{line}: the block uses {undefined} but never defines or imports them"


@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_block_runs_as_written(block, tmp_path, monkeypatch, request):
    path, line, _, code = block
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
        # the prelude is compiled apart, so that the block keeps its document's line numbers
        padded = "\n" * (line - 1) + code
        script = (f"exec(compile({prelude!r}, '<prelude>', 'exec'))\n"
                  f"exec(compile({padded!r}, {str(path)!r}, 'exec'), {{'__name__': '__main__'}})\n"
                  f"exec(compile({check!r}, '<check>', 'exec'))\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, f"{_name(path)}:{line} failed:\n{run.stderr[-4000:]}"
        return

    namespace = {"__name__": "__main__"}
    exec(_compiled(path, line, code), namespace)

    if reference is not None:  # the block's vq holds the reference's codebook: the reference's indices
        vq = namespace["vq"].eval()
        assert torch.equal(vq(probe).indices, reference(probe)[1])
