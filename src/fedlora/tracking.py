"""Live tracking: each run writes TensorBoard events into <run folder>/tensorboard, so that
`tensorboard --logdir runs/` shows the runs of a study side by side while they train.

Per round (step = round): accuracy per task and the mean (`accuracy/...`, at the rounds
that evaluate), the participants' train loss and the probe loss, the round time and the
simulated clock, bytes up and down (per round and in total), the number of participants;
the plan's q_i and ranks as histograms (`plan/...`) at round 0 and whenever the method
re-plans. The event time of every point is the run's simulated time, so TensorBoard's
"relative" horizontal axis reads simulated seconds. Written with torch.utils.tensorboard;
`track.tensorboard: false` turns it off. A resumed run drops the events of the rounds it
redoes (SummaryWriter's purge_step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class RunLog:
    def __init__(self, out: Path, *, enabled: bool, first_round: int):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"), purge_step=int(first_round))

    def row(self, row: dict, totals: dict, plan: dict | None = None) -> None:
        """One metrics row; `totals` holds the run's cumulative bytes; `plan` the plan in force
        when it changed this round (row["plan"] for online re-plans)."""
        w = self.writer
        if w is None:
            return
        t, clock = int(row["round"]), float(row["sim_time_s"])

        def scalar(tag: str, value) -> None:
            if value is not None:
                w.add_scalar(tag, float(value), t, walltime=clock)

        for task, acc in (row.get("eval") or {}).items():
            scalar(f"accuracy/{task}", acc)
        scalar("accuracy/mean", row.get("eval_mean"))
        scalar("loss/train", row.get("train_loss"))
        scalar("loss/probe", row.get("probe_loss"))
        scalar("time/round_s", row.get("round_time_s"))
        scalar("time/simulated_s", clock)
        scalar("bytes/upload", row.get("upload_bytes"))
        scalar("bytes/download", row.get("download_bytes"))
        scalar("bytes/upload_total", totals.get("upload_bytes"))
        scalar("bytes/download_total", totals.get("download_bytes"))
        scalar("clients/participants", len(row.get("participants", [])))
        plan = plan or row.get("plan")
        if plan and "participation_prob" in plan:
            w.add_histogram("plan/participation_prob", np.asarray(plan["participation_prob"], float), t,
                            walltime=clock)
            w.add_histogram("plan/ranks", np.asarray(plan["ranks"], float), t, walltime=clock)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
