"""FedLoraStrategy: a Flower Strategy that runs a fedlora Method on the simulated clock.

A thin adapter: `start` discovers the nodes and runs the same round loop as the in-process
simulator (fedlora.simulate.run -> fedlora.loop) with a `FlowerExecutor`, which turns a
round's client jobs into Messages (`configure_train`: each sampled client's node gets its
start sub-adapter, scaling, rank indices, regularizer and upload rule, and the server's
merged base delta, FLoRA) and the replies into the loop's ClientReplies (`aggregate_train`:
checked against the job's upload rule; the bytes charged are the bytes received). The
method, the clock, the evaluation and the stop rules are the loop's, line for line. Unlike
Flower's own strategies the two hooks take the round's jobs as an argument: the method,
not the strategy, decides who trains on what.

A node that errors or does not reply within `round_timeout` is recorded in the row's
"missing" list and counted as not sampled for that round (no update, no time on the
clock); a reply with wrong shapes or non-finite values is logged and recorded under
"rejected" like the simulator's NaN updates. result.json gets per-client counts
(`missing_replies`, `rejected_replies`). Nodes are (re)discovered every round by a query,
so a restarted node (new node id, same partition-id) rejoins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..config import InputError, RunConfig
from ..loop import ClientReplies, Executor
from ..methods.base import ClientJob, factors_payload, payload_values
from ..setup import Setup
from ..system import ClientProfile
from .common import array_record, check_payload, config_key, indices_list, record_tensors, wire_config

log = logging.getLogger("fedlora.flower")


@dataclasses.dataclass
class NodeSetup(Setup):
    """The server's Setup with the clients' sample counts as the nodes reported them."""

    reported_samples: np.ndarray | None = None

    @property
    def num_samples(self) -> np.ndarray:
        return self.reported_samples


def _info(msg: str, *args) -> None:
    log.warning(msg, *args)  # WARNING so that it shows in Flower's default log level


class FedLoraStrategy(Strategy):
    def __init__(self, cfg: RunConfig, out: Path, *, round_timeout: float = 600.0, connect_timeout: float = 300.0,
                 overwrite: bool = True, setup: Setup | None = None, query_timeout: float | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.round_timeout, self.connect_timeout = float(round_timeout), float(connect_timeout)
        self.query_timeout = float(query_timeout if query_timeout is not None else min(self.round_timeout, 120.0))
        self.overwrite = overwrite
        self._setup = setup  # the server's own data/model (cached per process)
        self.node_of: dict[int, int] = {}  # client (partition) id -> node id
        self.client_of: dict[int, int] = {}  # node id -> client id
        self.node_info: dict[int, dict] = {}  # client id -> its query answer
        self.missing_count: dict[int, int] = {}
        self.rejected_count: dict[int, int] = {}
        self._ignored: set[int] = set()  # nodes that answered the query with an error
        self.result: dict | None = None

    # --------------------------------------------------------------- discovery
    def _query(self, grid: Grid, node_ids: list[int]) -> None:
        if not node_ids:
            return
        msgs = [Message(RecordDict({"q": ConfigRecord({"want": "profile"})}), dst_node_id=n, message_type="query",
                        group_id="query") for n in node_ids]
        for reply in grid.send_and_receive(msgs, timeout=self.query_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                _info("query: node %s answered with an error: %s", node, reply.error.reason)
                self._ignored.add(node)
                continue
            info = dict(reply.content["info"])
            cid = int(info["partition-id"])
            if info["config-key"] != config_key(self.cfg):
                _info("query: node %s (partition %s) resolved a different config; ignored", node, cid)
                self._ignored.add(node)
                continue
            if int(info["num-partitions"]) not in (-1, self.cfg.data.num_clients):
                _info("query: node %s says num-partitions=%s but data.num_clients=%s", node, info["num-partitions"],
                      self.cfg.data.num_clients)
            old = self.node_of.get(cid)
            if old is not None and old != node:
                _info("partition %s rejoined as node %s (was node %s)", cid, node, old)
                self.client_of.pop(old, None)
            self.node_of[cid], self.client_of[node] = node, cid
            self.node_info[cid] = info

    def refresh_nodes(self, grid: Grid) -> None:
        """Query nodes not seen before (new or restarted); forget nodes the grid dropped."""
        live = set(int(n) for n in grid.get_node_ids())
        for node in [n for n in self.client_of if n not in live]:
            cid = self.client_of.pop(node)
            if self.node_of.get(cid) == node:
                del self.node_of[cid]
        self._query(grid, sorted(n for n in live if n not in self.client_of and n not in self._ignored))

    def discover(self, grid: Grid) -> None:
        n = self.cfg.data.num_clients
        deadline = time.monotonic() + self.connect_timeout
        while True:
            self.refresh_nodes(grid)
            if len(self.node_of) >= n:
                break
            if time.monotonic() > deadline:
                have = sorted(self.node_of)
                raise InputError(f"flower: only partitions {have} of data.num_clients={n} answered within "
                                 f"{self.connect_timeout:.0f}s (start one SuperNode per partition)")
            time.sleep(1.0)
        _info("nodes: %s", {c: self.node_of[c] for c in sorted(self.node_of)})

    def build_setup(self) -> NodeSetup:
        base = self._setup
        if base is None:
            from .common import cached_setup

            base = cached_setup(self.cfg)
        profiles, samples = [], []
        for cid in range(self.cfg.data.num_clients):
            info = self.node_info[cid]
            profiles.append(ClientProfile(id=cid, compute_time_s=float(info["compute_time_s"]),
                                          bits_per_s_per_hz=float(info["bits_per_s_per_hz"]),
                                          extra=json.loads(info["profile-extra"])))
            samples.append(int(info["num-samples"]))
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Setup)}
        fields.update(cfg=self.cfg, profiles=profiles)
        return NodeSetup(**fields, reported_samples=np.array(samples))

    # ---------------------------------------------------------- the two hooks
    def configure_train(self, server_round: int, jobs: dict[int, ClientJob], base_delta: dict,
                        train_config: ConfigRecord) -> tuple[list[Message], dict[int, int], list[int]]:
        """One train Message per job whose client has a node: (messages, node -> client, clients
        without a node). The whole merged base delta (FLoRA) goes along, not this round's merge:
        a node that missed rounds, restarted, or loads a fresh model gets the server's base."""
        msgs, sent, missing = [], {}, []
        key = config_key(self.cfg)
        for i, job in jobs.items():
            node = self.node_of.get(i)
            if node is None:
                missing.append(i)
                continue
            job_cfg = ConfigRecord({"round": server_round, "partition-id": i, "scaling": float(job.scaling),
                                    "compute-ratio": float(job.compute_ratio),
                                    "rank-indices": indices_list(job.rank_indices), "config-key": key,
                                    **wire_config("reg", job.regularizer), **wire_config("upload", job.upload),
                                    **dict(train_config.items())})
            content = RecordDict({"start": array_record(factors_payload(job.start)), "job": job_cfg})
            if base_delta:
                content["base-delta"] = array_record(base_delta)
            msgs.append(Message(content, dst_node_id=node, message_type="train", group_id=str(server_round),
                                ttl=max(self.round_timeout * 2, 60.0)))
            sent[node] = i
        return msgs, sent, missing

    def aggregate_train(self, server_round: int, jobs: dict[int, ClientJob], sent: dict[int, int],
                        missing: list[int], replies: Iterable[Message]) -> ClientReplies:
        """The replies as the loop's ClientReplies: each payload checked against its job's upload
        rule (a bad one is rejected and logged), the bytes charged are the bytes received, a
        client whose reply never came is missing (counted as not sampled)."""
        got = {}
        for reply in replies:
            cid = self._reply_client(server_round, reply, sent)
            if cid is not None:
                got[cid] = self._read_reply(server_round, cid, reply, jobs[cid])
        missing = sorted(set(missing) | {cid for cid in sent.values() if cid not in got})
        for cid in missing:
            self.missing_count[cid] = self.missing_count.get(cid, 0) + 1
        if missing:
            _info("round %s: missing replies from clients %s (counted as not sampled)", server_round, missing)
        out = ClientReplies(payloads={}, losses=[], upload_bits={}, rejected=[], missing=missing)
        bits_per_value = self.cfg.system.bytes_per_value * 8
        for i in jobs:  # job order, as the in-process executor
            if i in missing:
                continue
            payload, loss, why = got[i]
            out.upload_bits[i] = payload_values(payload or {}) * bits_per_value
            if why is not None:
                _info("round %s: rejected update of client %s: %s", server_round, i, why)
                out.rejected.append(i)
                self.rejected_count[i] = self.rejected_count.get(i, 0) + 1
                continue
            out.payloads[i] = payload
            out.losses.append(loss)
        return out

    def _reply_client(self, server_round: int, reply: Message, sent: dict[int, int]) -> int | None:
        """The client a reply answers for (None: an error reply or one from an unknown node)."""
        node = reply.metadata.src_node_id
        cid = sent.get(node)
        if cid is None:
            if reply.has_error():  # the SuperLink answers for a node it found gone (src node 1)
                _info("round %s: undeliverable message (node gone?): %s", server_round, reply.error.reason)
            else:
                _info("round %s: reply from unexpected node %s ignored", server_round, node)
            return None
        if reply.has_error():
            _info("round %s: client %s (node %s) failed: %s", server_round, cid, node, reply.error.reason)
            return None  # counted as missing
        return cid

    def _read_reply(self, server_round: int, cid: int, reply: Message, job: ClientJob):
        """(payload or None, loss, why it is unusable or None)."""
        try:
            payload = record_tensors(reply.content["payload"])
            m = reply.content["metrics"]
            loss, finite = float(m["loss"]), int(m["finite"])
            log.info("round %s client %s: handler %.2fs (setup %.2fs, train %.2fs)", server_round, cid,
                     float(m.get("handler-s", -1)), float(m.get("setup-s", -1)), float(m.get("compute-s", -1)))
        except (KeyError, TypeError, ValueError) as e:
            return None, None, f"malformed reply ({e.__class__.__name__}: {e})"
        why = check_payload(payload, job)
        if why is None and not finite:
            why = "client reported a non-finite loss"
        return payload, loss, why

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # evaluation is centralized (the server's fixed eval subset), as in the simulator

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        _info("FedLoraStrategy: method=%s clients=%s rounds=%s out=%s", self.cfg.method, self.cfg.data.num_clients,
              self.cfg.train.rounds, self.out)

    # --------------------------------------------------------------- the run
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config=None, evaluate_fn=None) -> Result:
        """Discover the nodes, then the simulator's run (fedlora.simulate.run) with a FlowerExecutor."""
        from ..simulate import run

        if timeout is not None:
            self.round_timeout = float(timeout)
        if num_rounds is not None and int(num_rounds) != self.cfg.train.rounds:
            raise InputError("flower: num_rounds must equal train.rounds (the run folder records train.rounds)")
        self.summary()
        wall0 = time.perf_counter()
        self.discover(grid)
        setup = self.build_setup()
        _info("discovery and setup took %.1fs", time.perf_counter() - wall0)
        executor = FlowerExecutor(self, grid, setup, train_config or ConfigRecord())
        self.result = run(self.cfg, self.out, overwrite=self.overwrite, progress=False, setup=setup,
                          executor=executor)
        result = Result()
        result.train_metrics_clientapp.update(executor.metrics)
        return result


class FlowerExecutor(Executor):
    """The loop's executor on a Flower grid: a round's jobs go out as Messages, replies come back."""

    def __init__(self, strategy: FedLoraStrategy, grid: Grid, setup: Setup, train_config: ConfigRecord):
        self.strategy, self.grid, self.setup, self.train_config = strategy, grid, setup, train_config
        self.metrics: dict[int, MetricRecord] = {}

    def train(self, round_idx: int, jobs: dict[int, ClientJob]) -> ClientReplies:
        s = self.strategy
        s.refresh_nodes(self.grid)
        msgs, sent, missing = s.configure_train(round_idx, jobs, self.setup.engine.base_delta(), self.train_config)
        replies = self.grid.send_and_receive(msgs, timeout=s.round_timeout) if msgs else []
        return s.aggregate_train(round_idx, jobs, sent, missing, replies)

    def round_done(self, row: dict) -> None:
        metrics = {"sim_time_s": float(row["sim_time_s"]), "round_time_s": float(row["round_time_s"]),
                   "participants": len(row["participants"]), "missing": len(row["missing"]),
                   "rejected": len(row["rejected"])}
        for key in ("train_loss", "eval_mean"):
            if row.get(key) is not None:
                metrics[key] = float(row[key])
        self.metrics[row["round"]] = MetricRecord(metrics)
        _info("round %s: participants %s missing %s rejected %s loss %s eval %s sim %.1fs wall %.1fs", row["round"],
              row["participants"], row["missing"], row["rejected"], row["train_loss"], row.get("eval_mean"),
              row["sim_time_s"], row["cpu_time_s"])

    def result_extra(self) -> dict:
        n = self.setup.cfg.data.num_clients
        s = self.strategy
        return {"engine": "flower", "missing_replies": {str(i): s.missing_count.get(i, 0) for i in range(n)},
                "rejected_replies": {str(i): s.rejected_count.get(i, 0) for i in range(n)}}


__all__ = ["FedLoraStrategy", "FlowerExecutor", "NodeSetup"]
