"""BinaryMapper: sampled and thresholded bits, their one-hot codes, the straight-through gradient, the KL aux
loss, log probabilities, errors."""

import math

import pytest
import torch

from vqdeploy import BinaryMapper


def test_sampled_bits_follow_their_sigmoids():
    torch.manual_seed(0)
    mapper = BinaryMapper(bits=3)
    logits = torch.tensor([-2.0, 0.0, 1.5]).expand(20000, 3)
    one_hot, indices, _ = mapper(logits, return_indices=True)
    bits = (indices[:, None] >> torch.arange(3)) & 1  # bit j is worth 2^j
    frequency = bits.float().mean(dim=0)
    # 20,000 draws: the standard error of a frequency is at most 0.0036; 5 of them
    torch.testing.assert_close(frequency, torch.tensor([-2.0, 0.0, 1.5]).sigmoid(), atol=0.018, rtol=0)
    assert torch.equal(one_hot.argmax(dim=-1), indices) and one_hot.shape == (20000, 8)
    cold = mapper(torch.tensor([[-2.0, 0.0, 1.5]]).expand(20000, 3), temperature=0.01, return_indices=True)[1]
    assert (cold == 4).float().mean() > 0.45  # near the threshold: bits 0 and 2 decided, bit 1 a coin


def test_deterministic_thresholds_and_eval_default():
    mapper = BinaryMapper(bits=4, deterministic_on_eval=True)
    logits = torch.randn(5, 7, 4)
    expected = ((logits > 0).long() * 2 ** torch.arange(4)).sum(dim=-1)
    assert torch.equal(mapper(logits, deterministic=True, return_indices=True).indices, expected)
    mapper.eval()
    out = mapper(logits, return_indices=True)
    assert torch.equal(out.indices, expected) and out.aux_kl_loss == 0 and not out.one_hot.requires_grad


def test_straight_through_gradient_is_the_code_distributions():
    """The one-hot's gradient is that of the probability of every code under independent bits."""
    mapper = BinaryMapper(bits=3)
    logits = torch.randn(6, 3, requires_grad=True)
    one_hot, _ = mapper(logits, deterministic=True)
    weights = torch.randn(8)
    (one_hot * weights).sum().backward()
    codes = ((torch.arange(8)[:, None] >> torch.arange(3)) & 1).bool()
    reference = logits.detach().clone().requires_grad_()
    probs = torch.where(codes, reference[:, None].sigmoid(), 1 - reference[:, None].sigmoid()).prod(dim=-1)
    (probs * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad)


def test_aux_loss_is_the_hinged_kl_to_uniform_codes():
    mapper = BinaryMapper(bits=2, kl_loss_threshold=0.1)
    logits = torch.tensor([[0.0, 0.0], [3.0, -3.0]])
    per_token = mapper.calc_aux_loss(logits, reduce_aux_kl_loss=False)
    p = torch.tensor(3.0).sigmoid()
    kl = 2 * math.log(2) - 2 * float(-(p * p.log() + (1 - p) * (1 - p).log()))
    torch.testing.assert_close(per_token, torch.tensor([0.0, kl - 0.1]))
    assert mapper.train()(logits)[1] == per_token.mean()


def test_log_prob_of_indices_and_one_hots():
    mapper = BinaryMapper(bits=5)
    logits = torch.randn(3, 4, 5)
    one_hot, indices, _ = mapper(logits, return_indices=True)
    by_index, by_one_hot = mapper.log_prob(logits, indices=indices), mapper.log_prob(logits, one_hot=one_hot)
    torch.testing.assert_close(by_index, by_one_hot)
    per_bit = mapper.log_prob(logits, indices=indices, sum_bits=False)
    assert per_bit.shape == (3, 4, 5)
    torch.testing.assert_close(per_bit.sum(dim=-1), by_index)
    all_codes = torch.arange(32).expand(3, 4, 32).permute(2, 0, 1)
    total = torch.stack([mapper.log_prob(logits, indices=c) for c in all_codes]).exp().sum(dim=0)
    torch.testing.assert_close(total, torch.ones(3, 4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be a positive int"):
        BinaryMapper(bits=0)
    with pytest.raises(ValueError, match="at most 24"):
        BinaryMapper(bits=40)
    mapper = BinaryMapper(bits=3)
    with pytest.raises(ValueError, match="end with 3 bits"):
        mapper(torch.randn(2, 4))
    with pytest.raises(TypeError, match="floating-point"):
        mapper(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        mapper.log_prob(torch.randn(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        mapper(torch.randn(2, 3), temperature=0.0)
