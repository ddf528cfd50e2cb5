"""Fused nearest-code search for CUDA: tensor-core scores, certified candidates, float64 rescoring.

``primitives.nearest_codes`` sends float32 CUDA matching here when Triton is installed (see :mod:`.dispatch`);
everything else (CPU, export, other dtypes, code dimensions above ``MAX_FUSED_DIM``) keeps the float32 torch
path, which is also the reference the kernel is measured against.  The kernel itself (:mod:`.kernel`) imports
Triton, so it is imported only when used.
"""

from .bounds import MAX_FUSED_DIM, SCORE_PRECISIONS, round_operand, score_error
from .dispatch import SETTINGS, FusedSearchSettings, fused_search_settings, fused_search_used, search_nearest

__all__ = ["SCORE_PRECISIONS", "round_operand", "score_error", "MAX_FUSED_DIM",
           "SETTINGS", "FusedSearchSettings", "fused_search_settings", "fused_search_used", "search_nearest"]
