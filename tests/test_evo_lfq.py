"""EvoLFQ: the autoencoder around LFQ, its bits, and the genetic search (against 1.32.0 in a subprocess)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from vqdeploy import LFQ, EvoLFQ

from reference_release import reference_dir

# 1.32.0 builds the same model from seed 0, draws a population from seed 1 and breeds one generation
REFERENCE_RUN = """
import json, torch
from torch import nn
import vector_quantize_pytorch as reference
torch.manual_seed(0)
evo = reference.EvoLFQ(nn.Linear(12, 8), nn.Linear(8, 12), dim=8, codebook_size=16, num_codebooks=2, pop_size=10,
                       elitism_count=2, tournament_size=3, mutation_rate=0.1)
target = torch.randn(12)
torch.manual_seed(1)
pop = evo.init_random_population(shape=(8,))
following, fitnesses = evo.step(pop, lambda decoded, bits: -(decoded - target).pow(2).sum(-1))
x = torch.randn(5, 12)
print(json.dumps(dict(state={k: v.tolist() for k, v in evo.state_dict().items()}, following=following.tolist(),
                      fitnesses=fitnesses.tolist(), bits=evo.encode(x).tolist(), decoded=evo.decode_bits(pop).tolist(),
                      x=x.tolist(), target=target.tolist())))
"""


def _model(**options):
    options = dict(dict(pop_size=10, elitism_count=2, tournament_size=3, mutation_rate=0.1), **options)
    return EvoLFQ(nn.Linear(12, 8), nn.Linear(8, 12), dim=8, codebook_size=16, num_codebooks=2, **options)


def test_a_seeded_generation_breeds_1_32_s_population():
    """Same state, same seed: the same population, fitnesses, bits and decoding (the random draws are 1.32.0's
    calls in its order)."""
    env = dict(os.environ, PYTHONPATH=str(reference_dir("1.32.0")))
    done = subprocess.run([sys.executable, "-c", REFERENCE_RUN], env=env, capture_output=True, text=True, check=True)
    reference = json.loads(done.stdout.strip().splitlines()[-1])
    evo = _model()
    evo.load_state_dict({key: torch.tensor(value) for key, value in reference["state"].items()}, strict=True)
    target = torch.tensor(reference["target"])
    torch.manual_seed(1)
    pop = evo.init_random_population(shape=(8,))
    following, fitnesses = evo.step(pop, lambda decoded, bits: -(decoded - target).pow(2).sum(-1))
    assert torch.equal(following, torch.tensor(reference["following"]))
    torch.testing.assert_close(fitnesses, torch.tensor(reference["fitnesses"]), atol=0, rtol=0)
    x = torch.tensor(reference["x"])
    assert torch.equal(evo.encode(x), torch.tensor(reference["bits"]))
    torch.testing.assert_close(evo.decode_bits(pop), torch.tensor(reference["decoded"]), atol=0, rtol=0)


def test_evolution_keeps_elites_and_finds_a_target():
    """The fittest genes lead the next generation; the best gene's fitness is what its decoding scores; a
    search for the bits of a target gets there."""
    torch.manual_seed(0)
    evo = _model()
    wanted = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1])
    target = evo.decode_bits(wanted[None])[0]

    def fitness(decoded, bits):
        return -(decoded - target).pow(2).sum(-1)

    pop = evo.init_random_population(shape=(8,))
    following, fitnesses = evo.step(pop, fitness)
    assert torch.equal(following[:2], pop[fitnesses.argsort(descending=True)[:2]])
    results = list(evo.evolve(fitness, pop_bits=pop, generations=30, return_best_decoded=True))
    best = results[-1]
    assert torch.equal(best.best_gene, wanted) and abs(best.best_fitness) < 1e-6  # (batched decoding rounds)
    torch.testing.assert_close(best.best_decoded, target)
    assert all(later.best_fitness >= earlier.best_fitness for earlier, later in zip(results, results[1:]))


def test_population_from_data_and_mutation():
    torch.manual_seed(0)
    evo = _model()
    x = torch.randn(3, 12)
    pop = evo.init_population_from_data(x, mutation_rate=0.0)
    assert pop.shape == (10, 8) and torch.equal(pop[:3], evo.encode(x)) and torch.equal(pop[3:6], pop[:3])
    flipped = evo.mutate(torch.zeros(20000, 8), mutation_rate=0.25)
    assert abs(flipped.mean().item() - 0.25) < 0.01  # 160,000 draws: 5 standard errors is 0.0054
    signs = evo.mutate(torch.ones(4, 8), mutation_rate=1.0, is_sign=True)
    assert torch.equal(signs, -torch.ones(4, 8))


def test_forward_is_the_autoencoder_and_vectors_are_one_token():
    torch.manual_seed(0)
    lfq = LFQ(dim=8, codebook_size=2**4, num_codebooks=2)
    evo = EvoLFQ(nn.Linear(12, 8), nn.Linear(8, 12), lfq)
    x = torch.randn(4, 12)
    reconstructed, indices, loss = evo(x)
    quantized, expected, _ = lfq(evo.encoder(x)[:, None])
    assert torch.equal(indices, expected[:, 0]) and reconstructed.shape == (4, 12) and loss.shape == ()
    torch.testing.assert_close(reconstructed, evo.decoder(quantized[:, 0]))
    torch.testing.assert_close(evo.eval().decode_bits(evo.encode(x)), evo(x).reconstructed)


@pytest.mark.parametrize("build, error, match", [
    (lambda: EvoLFQ(nn.Identity(), nn.Identity()), ValueError, "needs an lfq"),
    (lambda: _model(elitism_count=10), ValueError, "elitism_count"),
    (lambda: EvoLFQ(nn.Identity(), nn.Identity(), lfq=nn.Linear(2, 2)), TypeError, "LFQ"),
    (lambda: _model(mutation_rate=2.0), ValueError, "mutation_rate"),
])
def test_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_calls():
    evo = _model()
    with pytest.raises(ValueError, match="end with 8 bits"):
        evo.decode_bits(torch.ones(2, 6))
    with pytest.raises(ValueError, match="one fitness per gene"):
        evo.step(torch.ones(10, 8), lambda decoded, bits: decoded.sum())
    with pytest.raises(ValueError, match="shape of a gene"):
        next(evo.evolve(lambda decoded, bits: decoded.sum(-1)))
