"""Peak memory with 1000 clients vs 10 clients (target ratio <= 1.2).

Client state is data indices + a profile; the base model is shared. Each population runs
in its own process (peak RSS is per process) for the same work (iid split): two rounds with about
ten expected participants (q = 10 / N), same model, same eval subset.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
from fedlora.config import load_config
from fedlora import simulate
n = int(sys.argv[1])
cfg = load_config(sys.argv[2], [f"data.num_clients={n}", f"sampling.participation_prob={10 / n}",
                                "data.dirichlet_alpha=null", "data.min_client_samples=1", "data.max_train_per_task=null",
                                "train.rounds=2", "eval.every=2"])
with tempfile.TemporaryDirectory() as d:
    simulate.run(cfg, Path(d) / "run", progress=False)
print(json.dumps({"clients": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak(n: int) -> float:
    res = subprocess.run([sys.executable, "-c", CHILD, str(n), str(ROOT / "configs" / "smoke.yaml")],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    small, large = peak(10), peak(1000)
    print(f"peak RSS, 10 clients:   {small:8.1f} MB")
    print(f"peak RSS, 1000 clients: {large:8.1f} MB")
    print(f"ratio 1000/10: {large / small:.3f} (target <= 1.2)")


if __name__ == "__main__":
    main()
