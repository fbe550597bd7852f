"""scripts/rank_agreement.py: Spearman's rho of two rankings (docs/results.md, the 800-step study)."""

from __future__ import annotations

import importlib.util
import math

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("rank_agreement", ROOT / "scripts" / "rank_agreement.py")
rank_agreement = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rank_agreement)


def test_ranks_share_ties_and_rho_spans_minus_one_to_one():
    assert rank_agreement.ranks([3.0, 1.0, 2.0, 1.0]) == [4.0, 1.5, 3.0, 1.5]
    assert rank_agreement.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert rank_agreement.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # the study's NLL on the seed means: deceleration, velocity, heat, random-scale heat
    assert round(rank_agreement.spearman([6.70, 7.77, 8.91, 10.3], [5.90, 6.85, 6.35, 6.83]), 2) == 0.4
    assert math.isnan(rank_agreement.spearman([1, 1], [1, 2]))
