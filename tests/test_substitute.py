"""vqdeploy.substitute: programs written for vector-quantize-pytorch get vqdeploy's classes.

Each case runs in a subprocess: the test process imports the real vector-quantize-pytorch 1.14.17 for the
parity suites, and a substitution is for a whole program.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from reference_release import ROOT

PROGRAM = textwrap.dedent("""
    import sys
    import vector_quantize_pytorch as vqp
    from vector_quantize_pytorch import ResidualVQ, GroupedResidualVQ, FSQ, LFQ
    from vector_quantize_pytorch.residual_vq import ResidualVQ as FromSubmodule
    import vector_quantize_pytorch.finite_scalar_quantization as fsq_module
    import vqdeploy

    assert ResidualVQ is vqdeploy.ResidualVQ and FromSubmodule is vqdeploy.ResidualVQ
    assert GroupedResidualVQ is vqdeploy.GroupedResidualVQ and fsq_module.FSQ is vqdeploy.FSQ
    assert LFQ is vqdeploy.LFQ and vqp.VectorQuantize is vqdeploy.VectorQuantize
    vq = vqp.VectorQuantize(dim=8, codebook_size=16)
    lfq = LFQ(dim=4, codebook_size=16)
    print("arguments", sys.argv[1:])
    print("rotation_trick", vq.rotation_trick, "lfq commitment", lfq.commitment_loss_weight)
    from vector_quantize_pytorch import EvoLFQ, FSP, BinaryMapper, SimVQ, HierarchicalVQ
    from vector_quantize_pytorch.utils import Sequential
    assert (EvoLFQ, FSP, BinaryMapper) == (vqdeploy.EvoLFQ, vqdeploy.FSP, vqdeploy.BinaryMapper)
    assert (SimVQ, HierarchicalVQ, Sequential) == (vqdeploy.SimVQ, vqdeploy.HierarchicalVQ, vqdeploy.Sequential)
    import vqdeploy.substitute
    assert vqdeploy.substitute.is_substituted() and vqdeploy.substitute.substitute() is vqp
""")


def run(*arguments: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("VQDEPLOY_DEFAULTS", None)
    return subprocess.run([sys.executable, *arguments], env=env, capture_output=True, text=True, cwd=cwd)


def test_a_script_runs_on_vqdeploy_with_todays_defaults(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(PROGRAM)
    done = run("-m", "vqdeploy.substitute", str(script), "--epochs", "3")
    assert done.returncode == 0, done.stderr
    assert "arguments ['--epochs', '3']" in done.stdout
    assert "rotation_trick True lfq commitment 0.0" in done.stdout


def test_a_name_vqdeploy_lacks_raises_an_import_error_that_says_so():
    """Every 1.32.0 name is provided; a later release's name missing from vqdeploy reads as an ImportError."""
    from vqdeploy.substitute import NotProvided, _module

    module = _module("vector_quantize_pytorch.future", ("Present", "Missing"), {"Present": int})
    assert module.Present is int
    with pytest.raises(NotProvided, match="does not provide vector_quantize_pytorch.future.Missing yet"):
        module.Missing  # noqa: B018
    with pytest.raises(AttributeError):
        module.Unknown  # noqa: B018


def test_a_module_runs_with_1_14_17_defaults(tmp_path):
    (tmp_path / "trainer.py").write_text(PROGRAM)
    done = run("-m", "vqdeploy.substitute", "--defaults", "1.14.17", "-m", "trainer", "x", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "arguments ['x']" in done.stdout
    assert "rotation_trick False lfq commitment 0.25" in done.stdout


def test_substituting_after_the_real_import_is_refused():
    done = run("-c", "import vector_quantize_pytorch, vqdeploy.substitute as s; s.substitute()")
    assert done.returncode != 0
    assert "RuntimeError: vector_quantize_pytorch is imported already" in done.stderr
