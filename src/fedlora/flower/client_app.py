"""The fedlora ClientApp: one node = one fedlora client (its `partition-id`).

query: answers with its partition id, sample count and (simulated) system profile.
train: trains the sub-adapter it was sent with Engine.train_local on exactly the batches
the in-process simulator draws (client_batches(setup, partition_id, round)), on the base
the server sent (merged deltas, FLoRA) and with the regularizer it described (SOFT,
HetLoRA), and returns what the job's upload rule says (the change of every factor, the
factors themselves, SOFT's top components, HetLoRA's pruned ranks): the bytes that cross
the network are the method's own.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .common import array_record, cached_setup, config_key, load_run_config, record_tensors, wire_object

log = logging.getLogger("fedlora.flower")

app = ClientApp()


def partition_of(context: Context) -> tuple[int, int | None]:
    nc = context.node_config
    if "partition-id" not in nc:
        raise ValueError("node config has no partition-id (start the SuperNode with "
                         "--node-config \"partition-id=0 num-partitions=N\")")
    n = nc.get("num-partitions")
    return int(nc["partition-id"]), None if n is None else int(n)


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = load_run_config(context.run_config)
    pid, nparts = partition_of(context)
    if not 0 <= pid < cfg.data.num_clients:
        raise ValueError(f"partition-id {pid} outside 0..{cfg.data.num_clients - 1} (data.num_clients)")
    setup = cached_setup(cfg)
    p = setup.profiles[pid]
    info = ConfigRecord({
        "partition-id": pid, "num-partitions": -1 if nparts is None else nparts,
        "num-samples": int(len(setup.client_indices[pid])), "compute_time_s": float(p.compute_time_s),
        "bits_per_s_per_hz": float(p.bits_per_s_per_hz), "profile-extra": json.dumps(p.extra),
        "config-key": config_key(cfg), "pid": os.getpid()})
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from ..methods.base import ClientJob, DeltaUpload, client_payload, split_payload
    from ..setup import local_train

    t0 = time.perf_counter()
    cfg = load_run_config(context.run_config)
    pid, _ = partition_of(context)
    job_cfg = msg.content["job"]
    if int(job_cfg["partition-id"]) != pid:
        raise ValueError(f"message for partition {job_cfg['partition-id']} reached partition {pid}")
    if str(job_cfg["config-key"]) != config_key(cfg):
        raise ValueError("server and node resolved different fedlora configs")
    setup = cached_setup(cfg)
    t_setup = time.perf_counter() - t0
    # The server's merged base (FLoRA); none sent = the original base (a cached engine may
    # still hold another run's merges).
    delta = record_tensors(msg.content["base-delta"]) if "base-delta" in msg.content else {}
    setup.engine.load_base_delta(delta)
    start = split_payload(record_tensors(msg.content["start"]))
    idx = list(job_cfg.get("rank-indices", []))
    job = ClientJob(client_id=pid, start=start, scaling=float(job_cfg["scaling"]),
                    compute_ratio=float(job_cfg["compute-ratio"]), rank_indices=np.asarray(idx, dtype=np.int64),
                    regularizer=wire_object("reg", job_cfg), upload=wire_object("upload", job_cfg) or DeltaUpload())
    t = int(job_cfg["round"])
    res = local_train(setup, job, t)
    payload = client_payload(job, res.state)  # the method's upload rule, applied here
    loss = float(np.mean(res.losses)) if res.losses else float("nan")
    metrics = MetricRecord({"loss": loss, "finite": int(bool(res.finite)), "num-steps": int(res.num_steps),
                            "compute-s": float(res.compute_s), "setup-s": float(t_setup),
                            "handler-s": float(time.perf_counter() - t0)})
    meta = ConfigRecord({"partition-id": pid, "round": t, "pid": os.getpid()})
    return Message(RecordDict({"payload": array_record(payload), "metrics": metrics, "meta": meta}),
                   reply_to=msg)


__all__ = ["app", "query", "train"]
