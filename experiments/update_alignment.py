"""How consecutive applied updates line up: c_t = <A_t, A_{t+1}> / ||A_t||^2 and their cosine,
A_t what the server added to the adapter in round t (flat, LoRA factor space), for one run.

A scouting measurement for the online rounds model (docs/theory.md 8.4: at full
participation and rank, rho_t = (1 - c_t) / 2), not a compared run:

    python experiments/update_alignment.py CONFIG OUT [OVERRIDES...]
    python experiments/update_alignment.py results/scouting/n50/compare_280khz/config.yaml \\
        runs/alignment method=sample_full train.rounds=12 train.target_accuracy=null eval.every_s=100000
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from fedlora import loop, simulate
from fedlora.config import load_config
from fedlora.methods.proposed import applied_update


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    config, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    cfg = load_config(config, overrides)
    updates = []
    close_round = loop.close_round

    def recording(setup, method, clock, prog, t, state, rc, jobs, replies):
        new, row = close_round(setup, method, clock, prog, t, state, rc, jobs, replies)
        updates.append(applied_update(state, new))
        return new, row

    loop.close_round = recording  # the loop looks it up at call time
    simulate.run(cfg, out, overwrite=True, progress=False)
    gram = (torch.stack(updates) @ torch.stack(updates).T).numpy()
    norm2 = np.diag(gram)
    c = [gram[t, t + 1] / norm2[t] for t in range(len(gram) - 1)]
    cos = [gram[t, t + 1] / np.sqrt(norm2[t] * norm2[t + 1]) for t in range(len(gram) - 1)]
    summary = {"norm2": norm2.tolist(), "c": c, "cosine": cos}
    (out / "alignment.json").write_text(json.dumps(summary, indent=1))
    for name, v in summary.items():
        print(f"{name:>7}", " ".join(f"{x:.3g}" for x in v))


if __name__ == "__main__":
    main()
