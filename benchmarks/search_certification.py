"""How often would the fused search fall back, and how much selection work does it do?  A model of the kernel's
selection rule in torch, on the CPU: no GPU needed.

    python benchmarks/search_certification.py [--codes 1024 8192] [--rows 16384 4096] [--dim 256]
        [--configs bf16:16 tf32:8 bf16:8 tf32:4] [--data gaussian near]

For each configuration (score precision : kept candidates) and data (Gaussian rows and codes; rows near the
codes), it scores with operands rounded as the tensor cores round them, takes the bound E_j of
``vqdeploy.search.bounds.score_error``, and walks the codes as the kernel does (blocks of 64 rows, tiles of 32
codes; codes above the running upper bound left out; one extraction step at a time while any row of the block
needs one), then applies the kernel's certification (against the best upper bound, or the best kept code's
exact score).  It reports the extraction steps per tile, the share of row blocks that would take the float64
fallback, and the share of rows not certified.  The bound itself is checked on every score on the way.
"""

from __future__ import annotations

import argparse
import time


def simulate(data: str, rows: int, codes: int, dim: int, precision: str, candidates: int,
             block_rows: int = 64, tile: int = 32, seed: int = 0) -> dict:
    import torch

    from vqdeploy.search.bounds import round_operand, score_error

    g = torch.Generator().manual_seed(seed)
    book = torch.randn(codes, dim, generator=g)
    if data == "gaussian":
        x = torch.randn(rows, dim, generator=g)
    else:
        x = book[torch.randint(0, codes, (rows,), generator=g)] + 0.3 * torch.randn(rows, dim, generator=g)
    center = book.mean(dim=0)
    xc, cc = x - center, book - center
    xr, cr = round_operand(xc, precision), round_operand(cc, precision)
    approx = cc.square().sum(dim=-1) - 2 * (xr @ cr.t())
    err = score_error(xc, xr, cc, cr)
    exact = cc.double().square().sum(dim=-1) - 2 * (xc.double() @ cc.double().t())
    if not ((approx.double() - exact).abs() <= err.double()).all():
        raise AssertionError("the bound failed on a score")
    lower_all, upper_all = approx - err, approx + err
    steps = tiles = blocks_back = rows_back = 0
    inf = float("inf")
    slot_rows = torch.arange(block_rows)
    for first in range(0, rows, block_rows):
        lower_rows, upper_rows = lower_all[first:first + block_rows], upper_all[first:first + block_rows]
        n = lower_rows.shape[0]
        kept = torch.full((n, candidates), inf)
        kept_idx = torch.zeros((n, candidates), dtype=torch.long)
        upper = torch.full((n,), inf)
        dropped = torch.full((n,), inf)
        for start in range(0, codes, tile):
            upper = torch.minimum(upper, upper_rows[:, start:start + tile].min(dim=1).values)
            lower = lower_rows[:, start:start + tile].clone()
            lower = torch.where(lower <= upper[:, None], lower, inf)
            value, worst = lower.min(dim=1).values, kept.max(dim=1).values
            for _ in range(candidates):
                if not (value < worst).any():
                    break
                steps += 1
                col = lower.argmin(dim=1)
                lower[slot_rows[:n], col] = inf
                take = value < worst
                dropped = torch.minimum(dropped, torch.where(take, worst, value))
                slot = kept.argmax(dim=1)
                taken = slot_rows[:n][take]
                kept[taken, slot[take]] = value[take]
                kept_idx[taken, slot[take]] = start + col[take]
                value, worst = lower.min(dim=1).values, kept.max(dim=1).values
            dropped = torch.minimum(dropped, value)
            tiles += 1
        best = torch.where(kept < inf, exact[first:first + block_rows].gather(1, kept_idx), inf).min(dim=1).values
        uncertified = ~((dropped > upper) | (dropped.double() > best))
        rows_back += int(uncertified.sum())
        blocks_back += int(uncertified.any())
    blocks = -(-rows // block_rows)
    return dict(steps_per_tile=steps / tiles, blocks_falling_back=blocks_back / blocks,
                rows_uncertified=rows_back / rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--rows", type=int, nargs="+", default=[16384, 4096], help="one per codebook size")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--configs", nargs="+", default=["bf16:16", "tf32:8", "bf16:8", "tf32:4"])
    parser.add_argument("--data", nargs="+", default=["gaussian", "near"], choices=["gaussian", "near"])
    args = parser.parse_args(argv)
    if len(args.rows) != len(args.codes):
        parser.error("give one --rows per --codes")
    print(f"# the fused search's selection, modelled on the CPU; dim {args.dim}, blocks of 64 rows, tiles of 32")
    print(f"{'codes':>6} {'rows':>6} {'data':>9} {'config':>8} | {'steps/tile':>10} {'blocks back':>11} "
          f"{'rows uncertified':>16}")
    for codes, rows in zip(args.codes, args.rows):
        for data in args.data:
            for config in args.configs:
                precision, candidates = config.split(":")
                start = time.perf_counter()
                r = simulate(data, rows, codes, args.dim, precision, int(candidates))
                print(f"{codes:>6} {rows:>6} {data:>9} {config:>8} | {r['steps_per_tile']:10.2f} "
                      f"{r['blocks_falling_back']:11.4f} {r['rows_uncertified']:16.5f}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
