"""Seed 001's planned methods with the Appendix-C bound relaxed for large clients [ours].

The seed's sufficient condition q_i >= N gamma p_i^2 / (beta s_i) cannot hold for a client
whose data share exceeds sqrt(beta / (N gamma)) (about 0.19 with 20 clients and gamma/beta
= 1.3), and the seed's planner then has no plan at all. These variants pin such a client at
full rank and the largest q it may have (1 when q is planned; the fixed q in the rank
ablation): it adds no sketch variance, and no sampling variance at q = 1. Every other
client keeps the seed's bound, and the plan must still meet the condition the bound
guarantees, gamma Y < beta (a finite rounds factor); see docs/theory.md section 4.
Where the seed's planner has a plan, these give the same one.

  * proposed_relaxed: `proposed` (q and s planned) with the relaxation;
  * proposed_s_relaxed: `proposed_s` (q fixed, ranks planned) with the relaxation.
"""

from __future__ import annotations

from .planned_ablations import ProposedS
from .proposed import Proposed


class ProposedRelaxed(Proposed):
    name = "proposed_relaxed"
    summary = "seed 001's planner, Appendix-C bound relaxed: a client too large for it is pinned at q = s = 1"
    pin_large_clients = True


class ProposedSRelaxed(ProposedS):
    name = "proposed_s_relaxed"
    summary = "proposed_s with the Appendix-C bound relaxed: a client too large for it keeps full rank"
    pin_large_clients = True
