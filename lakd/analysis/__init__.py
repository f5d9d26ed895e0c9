"""Analyses of trained models: linear CKA (Figure 1), attention-map pictures, result tables (Table 1).

``lakd.analysis.visualize`` (matplotlib) is imported on use, not here.
"""
from __future__ import annotations

from .cka import (
    MinibatchCKA,
    center_gram,
    cka_from_grams,
    full_cka_matrix,
    gram_linear,
    hsic_unbiased,
    hsic_unbiased_matrix,
    linear_cka,
    minibatch_cka,
    run_cka,
)
from .report import build_tables, find_runs, load_run, make_report

__all__ = ["MinibatchCKA", "center_gram", "cka_from_grams", "full_cka_matrix", "gram_linear", "hsic_unbiased",
           "hsic_unbiased_matrix", "linear_cka", "minibatch_cka", "run_cka", "build_tables", "find_runs",
           "load_run", "make_report"]
