"""FedLoraStrategy: a Flower Strategy that runs a fedlora Method on the simulated clock.

Per round: `method.configure_round` samples clients independently with their q_i; each
sampled client's node gets one message with its own start sub-adapter, scaling, rank
indices, regularizer numbers (SOFT), the server's merged base delta (FLoRA) and round
config (`configure_train`); the replies' payload tensors (shapes differ
per client) go to `method.aggregate` (`aggregate_train`), and the round is closed exactly
as in the in-process simulator (fedlora.simulate.close_round: clock, eval, stop rules).

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
from ..methods import get_method
from ..methods.base import Method, payload_values
from ..rundir import write_atomic
from ..simulate import RoundClock, Setup, close_round, commit_round, finish, prepare_out, start_run_folder
from ..system import ClientProfile
from .common import (array_record, check_payload, config_key, indices_list, record_tensors, regularizer_config,
                     state_to_tensors, tensors_to_state)

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
        self._round: dict = {}
        self._ignored: set[int] = set()  # nodes that answered the query with an error
        self.setup: NodeSetup | None = None
        self.method: Method | None = None
        self.state = None

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

    # ------------------------------------------------------------ Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rc = self.method.configure_round(server_round, self.state)
        jobs = {j.client_id: j for j in rc.jobs}
        msgs, sent, missing = [], {}, []
        key = config_key(self.cfg)
        # The whole merged base delta (FLoRA), not this round's merge: a node that missed
        # rounds, restarted, or loads a fresh model per message still gets the server's base.
        base_delta = self.setup.engine.base_delta()
        for i, job in jobs.items():
            node = self.node_of.get(i)
            if node is None:
                missing.append(i)
                continue
            job_cfg = ConfigRecord({"round": server_round, "partition-id": i, "scaling": float(job.scaling),
                                    "compute-ratio": float(job.compute_ratio),
                                    "rank-indices": indices_list(job.rank_indices), "config-key": key,
                                    **regularizer_config(job.regularizer), **{k: v for k, v in config.items()}})
            content = RecordDict({"start": array_record(state_to_tensors(job.start)), "job": job_cfg})
            if base_delta:
                content["base-delta"] = array_record(base_delta)
            msgs.append(Message(content, dst_node_id=node, message_type="train", group_id=str(server_round),
                                ttl=max(self.round_timeout * 2, 60.0)))
            sent[node] = i
        self._round = {"t": server_round, "rc": rc, "jobs": jobs, "sent": sent, "missing": missing,
                       "cpu0": self._round.get("cpu0", time.perf_counter())}
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        r = self._round
        rc, jobs, sent, missing = r["rc"], r["jobs"], r["sent"], list(r["missing"])
        bpv = self.cfg.system.bytes_per_value
        got: dict[int, tuple[dict | None, float | None, float, str | None]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            cid = sent.get(node)
            if cid is None:
                if reply.has_error():  # the SuperLink answers for a node it found gone (src node 1)
                    _info("round %s: undeliverable message (node gone?): %s", server_round, reply.error.reason)
                else:
                    _info("round %s: reply from unexpected node %s ignored", server_round, node)
                continue
            if reply.has_error():
                _info("round %s: client %s (node %s) failed: %s", server_round, cid, node, reply.error.reason)
                continue  # counted as missing below
            why, payload, values = None, None, 0
            try:
                payload = record_tensors(reply.content["payload"])
                values = payload_values(payload)
                m = reply.content["metrics"]
                loss, finite = float(m["loss"]), int(m["finite"])
                log.info("round %s client %s: handler %.2fs (setup %.2fs, train %.2fs)", server_round, cid,
                         float(m.get("handler-s", -1)), float(m.get("setup-s", -1)), float(m.get("compute-s", -1)))
                why = check_payload(payload, jobs[cid].start)
                if why is None and not finite:
                    why = "client reported a non-finite loss"
            except (KeyError, TypeError, ValueError) as e:
                why, loss = f"malformed reply ({e.__class__.__name__}: {e})", None
            got[cid] = (payload, loss, values * bpv * 8, why)
        for cid in sent.values():
            if cid not in got:
                missing.append(cid)
        missing = sorted(missing)
        for cid in missing:
            self.missing_count[cid] = self.missing_count.get(cid, 0) + 1
        if missing:
            _info("round %s: missing replies from clients %s (counted as not sampled)", server_round, missing)
        part = {i: j for i, j in jobs.items() if i not in missing}  # replied (jobs order kept)
        payloads, losses, rejected, upload_bits = {}, [], [], {}
        own_payload = type(self.method).client_payload is not Method.client_payload
        for i, job in part.items():
            payload, loss, bits, why = got[i]
            upload_bits[i] = bits
            if why is not None:
                _info("round %s: rejected update of client %s: %s", server_round, i, why)
                rejected.append(i)
                self.rejected_count[i] = self.rejected_count.get(i, 0) + 1
                continue
            if own_payload:  # the method's own upload rule, applied to the trained factors
                trained = {n: (a + payload[f"{n}.A"], b + payload[f"{n}.B"]) for n, (a, b) in job.start.items()}
                payload = self.method.client_payload(job, trained)
                upload_bits[i] = payload_values(payload) * bpv * 8
            payloads[i] = payload
            losses.append(loss)
        self.state, row = close_round(self.setup, self.method, self.clock, self.prog, server_round, self.state, rc,
                                      part, payloads, losses, rejected, upload_bits, extra={"missing": missing})
        self._row = row
        metrics = {"sim_time_s": float(row["sim_time_s"]), "round_time_s": float(row["round_time_s"]),
                   "participants": len(row["participants"]), "missing": len(missing), "rejected": len(rejected)}
        if row["train_loss"] is not None:
            metrics["train_loss"] = float(row["train_loss"])
        if "eval_mean" in row:
            metrics["eval_mean"] = float(row["eval_mean"])
        return None, MetricRecord(metrics)

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
        cfg = self.cfg
        if timeout is not None:
            self.round_timeout = float(timeout)
        rounds = cfg.train.rounds if num_rounds is None else int(num_rounds)
        if rounds != cfg.train.rounds:
            raise InputError("flower: num_rounds must equal train.rounds (the run folder records train.rounds)")
        self.summary()
        wall0 = time.perf_counter()
        method_cls = get_method(cfg.method)
        if method_cls.needs_constants:
            from ..pilot import check_planner_inputs

            check_planner_inputs(cfg)
        self.discover(grid)
        self.setup = self.build_setup()
        _info("discovery and setup took %.1fs", time.perf_counter() - wall0)
        prepare_out(self.out, resume=False, overwrite=self.overwrite)
        ctx = self.setup.method_context()
        pre_run_s = 0.0
        if method_cls.needs_constants:
            from ..pilot import resolve_constants

            ctx.constants, pre_run_s = resolve_constants(cfg, self.out, setup=self.setup, progress=False)
        self.method = method_cls(ctx)
        self.state, self.prog = start_run_folder(self.setup, self.method, self.out, pre_run_s)
        self.clock = RoundClock(self.setup)
        result = Result()
        train_config = train_config or ConfigRecord()
        with open(self.out / "metrics.jsonl", "a") as metrics:
            t = 1
            while self.prog["stop_reason"] is None and t <= rounds:
                cpu0 = time.perf_counter()
                self._round = {"cpu0": cpu0}
                self.refresh_nodes(grid)
                msgs = list(self.configure_train(t, ArrayRecord(), train_config, grid))
                replies = grid.send_and_receive(msgs, timeout=self.round_timeout) if msgs else []
                _, agg = self.aggregate_train(t, replies)
                row = self._row
                row["cpu_time_s"] = time.perf_counter() - cpu0
                self.prog["cpu_time_s"] += row["cpu_time_s"]
                commit_round(self.out, metrics, row, self.state, self.method, self.setup.engine, self.prog)
                result.train_metrics_clientapp[t] = agg
                _info("round %s: participants %s missing %s rejected %s loss %s eval %s sim %.1fs wall %.1fs", t,
                      row["participants"], row["missing"], row["rejected"], row["train_loss"],
                      row.get("eval_mean"), row["sim_time_s"], row["cpu_time_s"])
                t += 1
        if self.prog["stop_reason"] is None:
            self.prog["stop_reason"] = "max_rounds"
        res = finish(self.setup, self.method, self.out, self.state, self.prog)
        res.update(engine="flower",
                   missing_replies={str(i): self.missing_count.get(i, 0) for i in range(cfg.data.num_clients)},
                   rejected_replies={str(i): self.rejected_count.get(i, 0) for i in range(cfg.data.num_clients)})
        write_atomic(self.out / "result.json", json.dumps(res, indent=1))
        result.arrays = array_record(state_to_tensors(self.state))
        self.result = res
        return result


__all__ = ["FedLoraStrategy", "NodeSetup", "tensors_to_state"]
