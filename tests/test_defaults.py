"""Whose defaults modules take (vqdeploy/defaults.py): 1.32.0's, 1.14.17's on request per module, per block,
per program or through the environment; explicit arguments win; modules and bundles remember their release."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vqdeploy
from vqdeploy import LFQ, GroupedResidualVQ, ResidualVQ, VectorQuantize, use_defaults
from vqdeploy.defaults import DIFFERING_DEFAULTS, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def _release_traits(vq: VectorQuantize) -> tuple:
    return (vq.rotation_trick, vq.return_zeros_for_masked_padding, vq.masked_indices_are_minus_one,
            float(vq._codebook.cluster_size.max()))


def test_compatibility_doc_lists_every_differing_default():
    assert markdown_table() in (ROOT / "docs" / "compatibility.md").read_text()
    assert all({"1.14.17", "1.32.0", "changed in", "note"} <= set(row) for row in DIFFERING_DEFAULTS.values())


def test_each_release_gives_its_defaults_per_module_block_and_program():
    assert vqdeploy.active_defaults() == "1.32.0"
    assert _release_traits(VectorQuantize(dim=4, codebook_size=8)) == (True, True, True, 1.0)
    assert _release_traits(VectorQuantize(dim=4, codebook_size=8, defaults="1.14.17")) == (False, False, False, 0.0)
    with use_defaults("1.14.17") as release:
        assert release == "1.14.17"
        rvq = ResidualVQ(dim=4, codebook_size=8, num_quantizers=2)
        assert all(_release_traits(layer) == (False, False, False, 0.0) for layer in rvq.layers)
        assert LFQ(dim=8, codebook_size=16).commitment_loss_weight == 0.25
        assert VectorQuantize(dim=4, codebook_size=8, defaults="1.32.0").rotation_trick
    assert vqdeploy.active_defaults() == "1.32.0" and LFQ(dim=8, codebook_size=16).commitment_loss_weight == 0.0
    use_defaults("1.14.17")
    try:
        assert not VectorQuantize(dim=4, codebook_size=8).rotation_trick
    finally:
        use_defaults("1.32.0")


@pytest.mark.parametrize("release, shapes", [("1.32.0", [(), (3,), (2, 3)]), ("1.14.17", [(1,), (1, 3), (2, 1, 3)])])
def test_loss_shapes_follow_the_release(release, shapes):
    x = torch.randn(2, 6, 8)
    modules = [VectorQuantize(dim=8, codebook_size=8, defaults=release),
               ResidualVQ(dim=8, codebook_size=8, num_quantizers=3, defaults=release),
               GroupedResidualVQ(dim=8, groups=2, codebook_size=8, num_quantizers=3, defaults=release)]
    for module, shape in zip(modules, shapes):
        assert module(x)[2].shape == shape and module.eval()(x)[2].shape == shape


def test_codes_after_kmeans_follow_the_release():
    """1.32.0 recomputes the codes from the k-means state (empty clusters become zero vectors); 1.14.17 keeps
    the cluster means."""
    x = torch.randn(1, 8, 4)  # 8 rows for 16 codes: at least 8 clusters stay empty
    for release in ("1.32.0", "1.14.17"):
        torch.manual_seed(0)
        vq = VectorQuantize(dim=4, codebook_size=16, kmeans_init=True, kmeans_iters=3, defaults=release)
        vq(x, freeze_codebook=True)  # k-means runs, the EMA step does not
        codebook = vq._codebook
        empty = codebook.cluster_size == 0
        assert int(empty.sum()) >= 8
        zero_codes = codebook.embed.abs().sum(dim=-1) == 0
        if release == "1.32.0":
            assert torch.equal(zero_codes, empty)
            torch.testing.assert_close(codebook.embed, codebook.codes_from(codebook.cluster_size, codebook.embed_avg))
        else:
            assert not zero_codes.any()


def test_explicit_arguments_win_and_the_rotation_trick_needs_two_dimensions():
    with use_defaults("1.14.17"):
        assert VectorQuantize(dim=4, codebook_size=8, rotation_trick=True).rotation_trick
    assert not VectorQuantize(dim=4, codebook_size=8, rotation_trick=False).rotation_trick
    assert not VectorQuantize(dim=1, codebook_size=8).rotation_trick
    assert not VectorQuantize(dim=4, codebook_size=8, straight_through=True, stochastic_sample_codes=True).rotation_trick
    with pytest.raises(ValueError, match="rotation_trick=True and straight_through=True"):
        VectorQuantize(dim=4, codebook_size=8, rotation_trick=True, straight_through=True)


@pytest.mark.parametrize("call", [lambda: use_defaults("1.18"), lambda: VectorQuantize(4, 8, defaults="latest"),
                                  lambda: ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, defaults=1.14)])
def test_unknown_releases_are_refused(call):
    with pytest.raises(ValueError, match="'1.14.17', '1.32.0'"):
        call()


def test_modules_record_their_release_so_a_rebuild_follows_it():
    grouped = GroupedResidualVQ(dim=8, groups=2, codebook_size=8, num_quantizers=2, defaults="1.14.17")
    assert grouped.init_config["defaults"] == "1.14.17"
    rebuilt = GroupedResidualVQ(**grouped.init_config)  # under the program's 1.32.0 defaults
    assert [_release_traits(layer) for rvq in rebuilt.rvqs for layer in rvq.layers] == \
        [(False, False, False, 0.0)] * 4
    assert vqdeploy.FSQ(levels=[8, 5]).init_config["defaults"] == "1.32.0"  # its rule on levels of 2


def test_a_bundle_rebuilds_with_the_release_it_was_exported_with(tmp_path):
    from vqdeploy.export import export

    with use_defaults("1.14.17"):
        export(VectorQuantize(dim=8, codebook_size=16), tmp_path / "vq")
    assert _release_traits(vqdeploy.load(tmp_path / "vq")) == (False, False, False, 0.0)


def test_the_environment_sets_the_program_default():
    script = "import vqdeploy; print(vqdeploy.active_defaults(), vqdeploy.VectorQuantize(4, 8).rotation_trick)"
    env = dict(os.environ, VQDEPLOY_DEFAULTS="1.14.17")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split() == ["1.14.17", "False"], done.stderr
    env["VQDEPLOY_DEFAULTS"] = "1.15"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "VQDEPLOY_DEFAULTS must be one of '1.14.17', '1.32.0'" in done.stderr
