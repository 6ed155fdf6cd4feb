"""fedlora on Flower: simulation engine (Ray), local deployment, faults.

Every Flower process is started by fedlora.flower.deploy.LocalFlower and stopped by PID in
the fixtures' finalizers (SIGTERM, then SIGKILL, children included).
Tolerances (docs/flower.md): participants, upload/download bytes exactly; sim_time_s
rel 1e-9; train_loss rel 1e-4; eval accuracies within one eval example.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from fedlora import setup as setup_mod
from fedlora import simulate
from fedlora.methods import METHODS
from fedlora.config import load_config
from fedlora.flower.deploy import LocalFlower, check_result, descendants

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def inprocess(tmp_path: Path, overrides: list[str]) -> list[dict]:
    out = tmp_path / "inprocess"
    simulate.run(load_config(SMOKE, overrides), out, progress=False)
    return rows(out)


def assert_same_numbers(ref: list[dict], got: list[dict]) -> None:
    assert [r["round"] for r in got] == [r["round"] for r in ref]
    for a, b in zip(ref, got):
        assert b["participants"] == a["participants"], b["round"]
        assert b["upload_bytes"] == a["upload_bytes"] and b["download_bytes"] == a["download_bytes"]
        assert math.isclose(b["sim_time_s"], a["sim_time_s"], rel_tol=1e-9, abs_tol=1e-12)
        if a["train_loss"] is None:
            assert b["train_loss"] is None
        else:
            assert math.isclose(b["train_loss"], a["train_loss"], rel_tol=1e-4)
        if "eval" in a:
            assert set(b["eval"]) == set(a["eval"])
            for task, acc in a["eval"].items():
                assert abs(b["eval"][task] - acc) <= 1.0 / 24 + 1e-12  # eval.max_examples = 24 in smoke


def stopped(flower: LocalFlower, pids: list[int]) -> None:
    flower.stop()
    import psutil

    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left running: {alive}"


@pytest.fixture
def flower_sim(tmp_path, request):
    f = LocalFlower(tmp_path / "flower", nodes=2, simulation=True)
    request.addfinalizer(f.stop)
    return f.start()


@pytest.fixture
def flower_deploy(tmp_path, request):
    f = LocalFlower(tmp_path / "flower", nodes=2)
    request.addfinalizer(f.stop)
    return f.start()


@pytest.fixture
def flower_deploy_insecure(tmp_path, request):
    """Without SuperNode authentication: the SuperLink re-admits a crashed, registered node only
    once it has missed two heartbeats (up to 60 s, docs/flower.md), too slow for a test."""
    f = LocalFlower(tmp_path / "flower", nodes=2, insecure=True)
    request.addfinalizer(f.stop)
    return f.start()


def test_flower_simulation_two_rounds_matches_inprocess(flower_sim, tmp_path):
    """`flwr run flower_app` on the simulation engine (Ray), smoke config with 2 clients (one
    Ray actor each on 2 cores), 2 rounds of SOFT uploading half its components: its
    regularizer and upload rule cross a real transport."""
    overrides = ["data.num_clients=2", "train.rounds=2", "method=soft", "options.soft_rho=0.5"]
    out = tmp_path / "flower_out"
    tree = flower_sim.pids() + descendants(flower_sim.superlink.pid)
    done = flower_sim.run(SMOKE, out, overrides=overrides, round_timeout=300, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    result = check_result(out)
    for name in ("config.yaml", "clients.json", "plan.json", "data.json", "metrics.jsonl", "result.json",
                 "adapter/adapter_config.json"):
        assert (out / name).exists(), name
    got = rows(out)
    assert all(r["missing"] == [] and r["rejected"] == [] for r in got[1:])
    assert result["engine"] == "flower" and result["rounds"] == 2
    assert result["missing_replies"] == {str(i): 0 for i in range(2)}
    clients = json.loads((out / "clients.json").read_text())
    assert [c["id"] for c in clients] == [0, 1]
    assert_same_numbers(inprocess(tmp_path, overrides), got)
    stopped(flower_sim, tree + descendants(flower_sim.superlink.pid))


# Strong enough that a node training without SOFT's regularizer or on an unmerged base
# leaves the tolerances (on the smoke config the default lambda and lr stay within them).
@pytest.mark.slow
def test_local_deployment_matches_inprocess(flower_deploy, tmp_path):
    """SuperLink + 2 SuperNodes on 127.0.0.1 (partition-id 0, 1), TLS and SuperNode
    authentication on: same numbers as the simulator, and a node whose key was never
    registered is refused. (Two nodes: each round starts a ClientApp process per node, and
    two fit 2 cores. One round: the state carried from round to round is checked through the
    strategy by the in-process tests below and on the simulation engine above.)"""
    from fedlora.flower.credentials import write_node_key

    assert flower_deploy.tls is not None and len(flower_deploy.node_keys) == 2
    intruder = flower_deploy.start_node(2, wait=False,
                                        private_key=write_node_key(tmp_path, "intruder").private_key)
    overrides = ["data.num_clients=2", "train.rounds=1"]
    out = tmp_path / "deploy_out"
    done = flower_deploy.run(SMOKE, out, overrides=overrides, round_timeout=300, timeout=900)
    assert intruder.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in (flower_deploy.logs / "supernode2.log").read_text()
    assert done.returncode == 0, done.stdout[-3000:]
    result = check_result(out)
    got = rows(out)
    assert result["missing_replies"] == {"0": 0, "1": 0}
    assert_same_numbers(inprocess(tmp_path, overrides), got)
    ref_result = json.loads((tmp_path / "inprocess" / "result.json").read_text())
    for task, acc in ref_result["final_eval"].items():
        assert abs(result["final_eval"][task] - acc) <= 1.0 / 48 + 1e-12  # final_max_examples = 48
    stopped(flower_deploy, flower_deploy.pids())


@pytest.mark.slow
def test_deployment_node_killed_mid_run_is_missing_and_rejoins(flower_deploy_insecure, tmp_path):
    """Kill SuperNode 1 once the run has started: its replies are missing, the run goes on;
    restarted, it rejoins. (Two rounds: every round costs each node a fresh ClientApp
    process, 40-60 s a round on a 2-core machine.)"""
    flower_deploy = flower_deploy_insecure
    import subprocess

    overrides = ["data.num_clients=2", "train.rounds=2", "sampling.participation_prob=1.0", "eval.every=2"]
    out = tmp_path / "fault_out"
    cmd = flower_deploy.run_command(SMOKE, out, overrides=overrides, round_timeout=60, connect_timeout=300)
    log = open(flower_deploy.logs / "flwr-run-fault.log", "wb")
    proc = subprocess.Popen(cmd, env=flower_deploy.env, cwd=flower_deploy.workdir, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    from fedlora.flower.deploy import stop_process

    try:
        deadline = time.monotonic() + 600
        # row 0 (evaluation before training) is written after discovery found both
        # nodes, and round 1 is sent right after it
        while not ((out / "metrics.jsonl").exists() and rows(out)):
            assert proc.poll() is None, (flower_deploy.logs / "flwr-run-fault.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "run too slow"
            time.sleep(0.5)
        flower_deploy.kill_node(1)  # crash: no goodbye to the SuperLink; round 1 was sent to it
        # restart at once: new node id, same partition; it needs seconds to register, so round
        # 1 (already addressed to the dead node) misses it and round 2 takes it in
        flower_deploy.start_node(1)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        stop_process(proc)
        log.close()
    result = check_result(out)
    got = rows(out)
    assert [r["round"] for r in got] == [0, 1, 2]
    assert got[1]["missing"] == [1] and got[1]["participants"] == [0], got
    assert got[2]["missing"] == [] and got[2]["participants"] == [0, 1], "restarted node did not rejoin"
    assert result["missing_replies"] == {"0": 0, "1": 1}
    assert "eval_mean" in got[-1] and result["rounds"] == 2


# ------------------------------------------------------- faults, in process (fast)


class FakeGrid:
    """A Grid that delivers messages to fedlora's ClientApp handlers in this process.

    `tamper(client, reply)` may change or drop (return None) a reply: a node that crashed
    or did not answer in time."""

    def __init__(self, run_config: dict, num_nodes: int, tamper=None):
        self.run_config, self.tamper = run_config, tamper
        self.nodes = {1000 + i: i for i in range(num_nodes)}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Context, RecordDict

        from fedlora.flower import client_app

        replies = []
        for m in messages:
            pid = self.nodes[m.metadata.dst_node_id]
            ctx = Context(run_id=1, node_id=m.metadata.dst_node_id, node_config={"partition-id": pid,
                          "num-partitions": len(self.nodes)}, state=RecordDict(), run_config=self.run_config)
            handler = client_app.query if m.metadata.message_type == "query" else client_app.train
            reply = handler(m, ctx)
            if self.tamper is not None and m.metadata.message_type == "train":
                reply = self.tamper(pid, reply)
            if reply is not None:
                replies.append(reply)
        return replies


@pytest.fixture
def task_identity(monkeypatch):
    """Messages built outside a Flower process need the task identity Flower would set."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def run_fake(tmp_path, tamper, overrides):
    from fedlora.flower.strategy import FedLoraStrategy

    run_config = {"fedlora-config": str(SMOKE), "overrides": " ".join(overrides), "out-dir": str(tmp_path / "o")}
    cfg = load_config(SMOKE, overrides)
    strategy = FedLoraStrategy(cfg, tmp_path / "o", round_timeout=5)
    strategy.start(FakeGrid(run_config, cfg.data.num_clients, tamper))
    return rows(tmp_path / "o"), json.loads((tmp_path / "o" / "result.json").read_text())


def test_missing_and_bad_replies_are_recorded(tmp_path, caplog, task_identity):
    import torch
    from flwr.app import ArrayRecord

    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    def tamper(pid, reply):
        t = int(reply.content["meta"]["round"])
        if pid == 3 and t == 1:  # node gone: the SuperLink answers with an error from node 1
            return create_message_error_unavailable_res_message(reply.metadata, "NODE_UNAVAILABLE")
        if pid == 0 and t == 1:  # NaN update
            p = reply.content["payload"].to_torch_state_dict()
            k = next(iter(p))
            p[k] = torch.full_like(p[k], float("nan"))
            reply.content["payload"] = ArrayRecord(dict(p))
        if pid == 2 and t == 1:  # integer factors
            p = reply.content["payload"].to_torch_state_dict()
            k = next(iter(p))
            p[k] = p[k].to(torch.int64)
            reply.content["payload"] = ArrayRecord(dict(p))
        if pid == 1 and t == 2:  # wrong shapes
            p = reply.content["payload"].to_torch_state_dict()
            k = next(iter(p))
            p[k] = torch.zeros(p[k].shape[0] + 1, *p[k].shape[1:])
            reply.content["payload"] = ArrayRecord(dict(p))
        if pid == 3 and t == 2:  # one rank fewer than its job, A and B consistent
            p = reply.content["payload"].to_torch_state_dict()
            p = {k: (v[:-1] if k.endswith(".A") else v[:, :-1]).contiguous() for k, v in p.items()}
            reply.content["payload"] = ArrayRecord(p)
        return reply

    overrides = ["train.rounds=2", "sampling.participation_prob=1.0"]
    with caplog.at_level("WARNING", logger="fedlora.flower"):
        got, result = run_fake(tmp_path, tamper, overrides)
    r1, r2 = got[1], got[2]
    assert r1["missing"] == [3] and r1["participants"] == [0, 1, 2] and r1["rejected"] == [0, 2]
    assert r2["missing"] == [] and r2["participants"] == [0, 1, 2, 3] and r2["rejected"] == [1, 3]
    assert result["missing_replies"] == {"0": 0, "1": 0, "2": 0, "3": 1}
    assert result["rejected_replies"] == {"0": 1, "1": 1, "2": 1, "3": 1}
    text = caplog.text
    assert "non-finite" in text and "dtype torch.int64" in text and "missing replies from clients [3]" in text
    assert text.count("shape") >= 2  # the extra row and the missing rank
    assert "undeliverable message" in text and "unexpected node" not in text
    assert all(math.isfinite(v) for v in result["final_eval"].values())


def test_fake_grid_matches_inprocess(tmp_path, task_identity):
    """The strategy + ClientApp handlers without any transport: the simulator's numbers, exactly."""
    overrides = ["train.rounds=2"]
    got, _ = run_fake(tmp_path, None, overrides)
    ref = inprocess(tmp_path, overrides)
    assert [{k: v for k, v in r.items() if k not in ("cpu_time_s", "missing")} for r in got] == \
        [{k: v for k, v in r.items() if k != "cpu_time_s"} for r in ref]


@pytest.fixture(scope="module")
def shared_setups():
    """(server setup, node setup): built once for the module, two separate models, as the
    server and the nodes have; each test swaps in its own config (same data and model)."""
    cfg = load_config(SMOKE, EVERY_METHOD)
    return setup_mod.build_setup(cfg), setup_mod.build_setup(cfg)


# Small enough for 20 methods x 2 runs; SOFT and TSFA upload half their components (indices
# on the wire), HetLoRA prunes, FLoRA merges into the base, FlexLoRA unicasts.
EVERY_METHOD = ["train.rounds=2", "train.local_steps=1", "sampling.participation_prob=1.0", "lora.layers=[5]",
                "eval.max_examples=8", "eval.final_max_examples=8", "options.soft_rho=0.5",
                "options.hetlora_decay=0.5"]
# HetLoRA prunes only where training shrank the tail; with SGD and every client in each round
# one client prunes in round 2 (its upload is smaller: the node applied the rule).
PER_METHOD = {"hetlora": ["train.optimizer=sgd", "options.hetlora_prune_lambda=0.1", "options.clients_per_round=4"]}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_flower_matches_inprocess(tmp_path, task_identity, monkeypatch, shared_setups, method):
    """Each method, 2 rounds, through the strategy and the ClientApp handlers (nodes with their
    own model, applying the method's upload rule) and in process: the same rows, bytes
    included (the bytes charged on Flower are those of the replies received)."""
    import dataclasses

    from fedlora.flower import client_app
    from fedlora.flower.strategy import FedLoraStrategy

    overrides = [f"method={method}", *EVERY_METHOD, *PER_METHOD.get(method, [])]
    cfg = load_config(SMOKE, overrides)
    server, node = (dataclasses.replace(s, cfg=cfg) for s in shared_setups)
    monkeypatch.setattr(client_app, "cached_setup", lambda c: dataclasses.replace(node, cfg=c))
    run_config = {"fedlora-config": str(SMOKE), "overrides": " ".join(overrides), "out-dir": str(tmp_path / "o")}
    FedLoraStrategy(cfg, tmp_path / "o", round_timeout=5, setup=server).start(
        FakeGrid(run_config, cfg.data.num_clients))
    got = rows(tmp_path / "o")
    simulate.run(cfg, tmp_path / "ref", setup=server, progress=False)
    ref = rows(tmp_path / "ref")
    assert any(r["participants"] for r in got[1:]) and all(r["rejected"] == [] for r in got[1:])
    assert [{k: v for k, v in r.items() if k not in ("cpu_time_s", "missing")} for r in got] == \
        [{k: v for k, v in r.items() if k != "cpu_time_s"} for r in ref]
    if method == "hetlora":
        assert got[2]["upload_bytes"] < got[1]["upload_bytes"], "no client pruned: the test shows nothing"
