"""EvoLFQ: an encoder, an LFQ bottleneck and a decoder, with a genetic search over the LFQ bits (1.32.0).

``forward`` is the autoencoder (a graph like LFQ's).  The search treats a latent's bits as a gene: a population
is decoded, scored by a user's fitness function, and bred by tournament selection, uniform crossover and
mutation, keeping the best ``elitism_count`` genes.  The search is a host-driven loop over generations (one
fitness call each), as 1.32.0 runs it, and draws its random numbers with the same calls, so a seeded step
breeds the same population.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple

import torch
from einops import rearrange, repeat
from torch import nn

from .checks import number, positive_int
from .lfq import LFQ


class EvoLFQOutput(NamedTuple):
    reconstructed: torch.Tensor
    indices: torch.Tensor
    entropy_aux_loss: torch.Tensor


class EvolutionResult(NamedTuple):
    """One generation of ``EvoLFQ.evolve``: the bred population and the best gene found so far."""

    pop_bits: torch.Tensor
    best_gene: torch.Tensor
    best_fitness: float
    best_decoded: torch.Tensor | None


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """``module`` in eval inside the block, its own mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class EvoLFQ(nn.Module):
    """``decoder(LFQ(encoder(x)))`` plus a genetic search over the LFQ's bits (``evolve``)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, lfq: LFQ | None = None, *, dim: int | None = None,
                 codebook_size: int | None = None, num_codebooks: int = 1, pop_size: int = 64,
                 mutation_rate: float = 0.02, tournament_size: int = 2, elitism_count: int = 1,
                 generations: int = 50, **lfq_kwargs):
        super().__init__()
        for name, value in (("pop_size", pop_size), ("tournament_size", tournament_size),
                            ("generations", generations)):
            positive_int(name, value)
        if not isinstance(elitism_count, int) or isinstance(elitism_count, bool) or not 0 <= elitism_count < pop_size:
            raise ValueError(f"elitism_count must be an int in [0, pop_size) ({pop_size}), got {elitism_count!r}")
        number("mutation_rate", mutation_rate, 0.0, 1.0)
        if lfq is None:
            if dim is None and codebook_size is None:
                raise ValueError("EvoLFQ needs an lfq, or dim / codebook_size to build one")
            lfq = LFQ(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks, **lfq_kwargs)
        elif not isinstance(lfq, LFQ):
            raise TypeError(f"lfq must be a vqdeploy LFQ, got {type(lfq).__name__}")
        self.encoder, self.decoder, self.lfq = encoder, decoder, lfq
        self.pop_size, self.mutation_rate = pop_size, mutation_rate
        self.tournament_size, self.elitism_count, self.generations = tournament_size, elitism_count, generations
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.zero.device

    def _quantize(self, latents: torch.Tensor, **kwargs):
        """LFQ of (b, n, d) latents, or of single vectors (b, d) as one-token sequences."""
        single = latents.ndim == 2
        quantized, indices, loss = self.lfq(latents.unsqueeze(1) if single else latents, **kwargs)
        if single:
            quantized, indices = quantized.squeeze(1), indices.squeeze(1)
        return quantized, indices, loss

    def forward(self, x: torch.Tensor, **kwargs) -> EvoLFQOutput:
        """``(decoder(quantized), indices, aux_loss)`` of x; ``kwargs`` go to the LFQ."""
        quantized, indices, loss = self._quantize(self.encoder(x), **kwargs)
        return EvoLFQOutput(self.decoder(quantized), indices, loss)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, return_signs: bool = False) -> torch.Tensor:
        """The bits of x's quantized latents (1/0, or +1/-1 with ``return_signs``), in eval."""
        with _eval_mode(self):
            quantized = self._quantize(self.encoder(x))[0]
        return torch.where(quantized > 0, 1.0, -1.0) if return_signs else (quantized > 0).float()

    @torch.no_grad()
    def decode_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits (..., num_codebooks * codebook_dim), 0/1 or -1/+1, -> the decoder's output of their codes."""
        with _eval_mode(self):
            lead = bits.shape[:-1]
            bits = (bits > 0).int().reshape(-1, bits.shape[-1])
            codebook_dim, num_codebooks = self.lfq.codebook_dim, self.lfq.num_codebooks
            if bits.shape[-1] != codebook_dim * num_codebooks:
                raise ValueError(f"bits must end with {codebook_dim * num_codebooks} bits, got {tuple(lead)} + "
                                 f"({bits.shape[-1]},)")
            bits = rearrange(bits, "n (c d) -> n c d", c=num_codebooks)
            weights = 2 ** torch.arange(codebook_dim - 1, -1, -1, device=bits.device)
            indices = (bits * weights).sum(dim=-1)  # (n, c)
            if not self.lfq.keep_num_codebooks_dim:
                indices = indices[:, 0]
            codes = self.lfq.indices_to_codes(indices)
            return self.decoder(codes.reshape(*lead, codes.shape[-1]))

    # ------------------------------------------------------------------ the genetic search

    def init_random_population(self, pop_size: int | None = None, shape: tuple[int, ...] | None = None,
                               device=None, is_sign: bool = False) -> torch.Tensor:
        pop_size = pop_size or self.pop_size
        bits = torch.randint(0, 2, (pop_size, *shape), device=device or self.device).float()
        return torch.where(bits > 0, 1.0, -1.0) if is_sign else bits

    def init_population_from_data(self, x: torch.Tensor, pop_size: int | None = None,
                                  mutation_rate: float | None = None, is_sign: bool = False) -> torch.Tensor:
        """x's bits, repeated (or cut) to ``pop_size`` genes, then mutated."""
        pop_size = pop_size or self.pop_size
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        bits = self.encode(x, return_signs=is_sign)
        if bits.shape[0] < pop_size:
            bits = repeat(bits, "b ... -> (r b) ...", r=-(-pop_size // bits.shape[0]))
        bits = bits[:pop_size]
        return self.mutate(bits, mutation_rate=mutation_rate, is_sign=is_sign) if mutation_rate > 0 else bits

    def uniform_crossover(self, parent1: torch.Tensor, parent2: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.rand_like(parent1.float()) < 0.5, parent1, parent2)

    def mutate(self, population: torch.Tensor, mutation_rate: float | None = None, is_sign: bool = False):
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        flip = torch.rand_like(population.float()) < mutation_rate
        return torch.where(flip, -population if is_sign else 1.0 - population, population)

    def tournament_selection(self, population: torch.Tensor, fitnesses: torch.Tensor,
                             tournament_size: int | None = None) -> torch.Tensor:
        """Each slot gets the fittest of ``tournament_size`` random genes."""
        tournament_size = tournament_size or self.tournament_size
        contenders = torch.randint(0, population.shape[0], (population.shape[0], tournament_size),
                                   device=self.device)
        winners = contenders.gather(1, fitnesses[contenders].argmax(dim=-1, keepdim=True))
        return population[winners[:, 0]]

    def _fitnesses(self, pop_bits: torch.Tensor, fitness_fn: Callable, batch_size: int | None) -> torch.Tensor:
        if batch_size is not None:
            decoded = torch.cat([self.decode_bits(chunk) for chunk in pop_bits.split(batch_size)])
        else:
            decoded = self.decode_bits(pop_bits)
        fitnesses = fitness_fn(decoded, pop_bits)
        fitnesses = torch.as_tensor(fitnesses, dtype=torch.float32, device=self.device)
        if fitnesses.shape != (pop_bits.shape[0],):
            raise ValueError(f"fitness_fn must return one fitness per gene ({pop_bits.shape[0]}), got shape "
                             f"{tuple(fitnesses.shape)}")
        return fitnesses

    @torch.no_grad()
    def step(self, pop_bits: torch.Tensor, fitness_fn: Callable, tournament_size: int | None = None,
             mutation_rate: float | None = None, elitism_count: int | None = None, is_sign: bool = False,
             batch_size: int | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """One generation: ``(next population, the fitnesses of pop_bits)``.  The elites lead the next
        population (fittest first); each other gene is the uniform crossover of two tournament winners,
        mutated."""
        tournament_size = tournament_size or self.tournament_size
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        elitism_count = self.elitism_count if elitism_count is None else elitism_count
        pop_size = pop_bits.shape[0]
        fitnesses = self._fitnesses(pop_bits, fitness_fn, batch_size)
        elites = pop_bits[torch.argsort(fitnesses, descending=True)[:elitism_count]].clone()
        contenders = torch.randint(0, pop_size, (pop_size - elitism_count, 2, tournament_size), device=self.device)
        parents = contenders.gather(-1, fitnesses[contenders].argmax(dim=-1, keepdim=True))[..., 0]
        first, second = rearrange(pop_bits[parents], "n p ... -> p n ...")
        offspring = self.mutate(self.uniform_crossover(first, second), mutation_rate=mutation_rate, is_sign=is_sign)
        return torch.cat([elites, offspring]), fitnesses

    @torch.no_grad()
    def evolve(self, fitness_fn: Callable, pop_bits: torch.Tensor | None = None, pop_size: int | None = None,
               shape: tuple[int, ...] | None = None, generations: int | None = None, is_sign: bool = False,
               return_best_decoded: bool = False, **step_kwargs) -> Iterator[EvolutionResult]:
        """Yield each generation's result.  The best gene is the fittest gene evaluated so far (1.32.0 pairs
        the best fitness with the gene at the same position of the next population)."""
        if pop_bits is None:
            if shape is None:
                raise ValueError("evolve needs pop_bits or the shape of a gene")
            pop_bits = self.init_random_population(pop_size, shape, is_sign=is_sign)
        best_fitness, best_gene = float("-inf"), None
        for _ in range(generations or self.generations):
            evaluated = pop_bits
            pop_bits, fitnesses = self.step(evaluated, fitness_fn, is_sign=is_sign, **step_kwargs)
            fittest = int(fitnesses.argmax())
            if float(fitnesses[fittest]) > best_fitness:
                best_fitness, best_gene = float(fitnesses[fittest]), evaluated[fittest].clone()
            best_decoded = self.decode_bits(best_gene.unsqueeze(0))[0] if return_best_decoded else None
            yield EvolutionResult(pop_bits, best_gene, best_fitness, best_decoded)
