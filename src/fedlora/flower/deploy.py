"""Start a local Flower deployment (or simulation SuperLink), run flower_app through it, stop it.

Everything runs on 127.0.0.1 on free ports, with FLWR_HOME in a private folder (so the
user's ~/.flwr is never touched). By default every connection uses TLS (a throw-away CA and
server certificate) and the SuperLink admits only SuperNodes whose public keys were
registered with `flwr supernode register` (credentials in WORKDIR/credentials,
fedlora.flower.credentials); `insecure=True` turns both off and a copy of flower_app/ (flwr 1.41 rewrites an app's
pyproject.toml when it finds legacy [tool.flwr.federations] entries; the copy has them
removed). Every process is started in its own session and stopped by its process group
id (= the PID we started): SIGTERM, then SIGKILL after a grace period, also on error.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..config import InputError
from .common import repo_root

APP_DIR = repo_root() / "flower_app"


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of `pid` (the processes it started, transitively)."""
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # psutil missing, or the process is gone
        return []


def _signal(pids: list[int], sig) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Stop a process we started and everything it started: SIGTERM, wait, then SIGKILL.

    Children are collected by PID before the parent goes (Flower detaches its SuperExec
    into another session, so a process-group kill alone would miss it)."""
    if proc is None:
        return
    tree = descendants(proc.pid)
    if proc.poll() is None:
        _signal([proc.pid], signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    tree = list(dict.fromkeys(tree + descendants(proc.pid)))
    _signal(tree, signal.SIGTERM)
    deadline = time.monotonic() + min(grace, 5.0)
    try:
        import psutil

        while time.monotonic() < deadline and any(psutil.pid_exists(p) and
                                                  psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                                  for p in tree):
            time.sleep(0.2)
    except Exception:
        pass
    _signal(tree + ([proc.pid] if proc.poll() is None else []), signal.SIGKILL)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def app_copy(dst: Path, src: Path = APP_DIR) -> Path:
    """flower_app/ without the legacy federations section (see module doc)."""
    dst.mkdir(parents=True, exist_ok=True)
    text = (src / "pyproject.toml").read_text()
    keep, skip = [], False
    for line in text.splitlines(keepends=True):
        m = re.match(r"\s*\[(.*)\]", line)
        if m:
            skip = m.group(1).startswith("tool.flwr.federations")
        if not skip:
            keep.append(line)
    (dst / "pyproject.toml").write_text("".join(keep))
    for extra in src.iterdir():
        if extra.name != "pyproject.toml" and extra.is_file() and extra.suffix in (".md", ".toml", ".yaml"):
            shutil.copy(extra, dst / extra.name)
    return dst


class LocalFlower:
    """A SuperLink (deployment, or simulation with --simulation) and N SuperNodes on 127.0.0.1."""

    def __init__(self, workdir: Path | None = None, *, nodes: int = 3, simulation: bool = False,
                 num_partitions: int | None = None, env: dict | None = None, quiet: bool = True,
                 insecure: bool = False, client_cpus: int = 1):
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.mkdtemp(prefix="fedlora-flower-")
            workdir = Path(self._tmp)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes, self.simulation = int(nodes), simulation
        self.num_partitions = int(num_partitions if num_partitions is not None else nodes)
        self.flwr_home = self.workdir / "flwr_home"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = {**os.environ, "FLWR_HOME": str(self.flwr_home),
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", **(env or {})}
        bindir = str(Path(sys.executable).parent)  # flower-superexec & co. are looked up on PATH
        self.env["PATH"] = bindir + os.pathsep + self.env.get("PATH", "")
        self.quiet = quiet
        self.client_cpus = int(client_cpus)  # simulation: CPUs per ClientApp actor (Ray)
        self.insecure = insecure or simulation  # the simulation engine has no SuperNodes to admit
        self.credentials = self.workdir / "credentials"
        self.tls = None  # TlsFiles once started securely
        self.node_keys: dict[int, object] = {}  # partition -> its registered NodeKey
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[int, subprocess.Popen] = {}
        self._restarts: dict[int, int] = {}
        # flwr 1.41: the SuperLink serves its Runtime, Control and Fleet APIs over HTTP on one port
        (self.port, *self.node_ports) = free_ports(1 + self.nodes)
        self.control_port = self.fleet_port = self.port

    # ---------------------------------------------------------------- start
    def _popen(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.logs / log_name, "ab")
        try:
            return subprocess.Popen(cmd, env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()

    def start(self, timeout: float = 120.0) -> "LocalFlower":
        try:
            self.flwr_home.mkdir(parents=True, exist_ok=True)
            if not self.insecure:
                from .credentials import write_tls

                self.tls = write_tls(self.credentials)
            trust = 'insecure = true\n' if self.insecure else f'root-certificates = "{self.tls.ca_cert}"\n'
            (self.flwr_home / "config.toml").write_text(
                '[superlink]\ndefault = "fedlora"\n\n[superlink.fedlora]\n'
                f'address = "127.0.0.1:{self.control_port}"\n' + trust)
            # the app's code is the installed fedlora package: no per-run environment (no uv, no network)
            cmd = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                   "--disable-runtime-dependency-installation"]
            cmd += ["--insecure"] if self.insecure else [
                "--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key), "--enable-supernode-auth"]
            if self.simulation:
                cmd.append("--simulation")
            self.superlink = self._popen(cmd, "superlink.log")
            self._wait(lambda: port_open(self.port), self.superlink, "superlink", timeout)
            if not self.simulation:
                if not self.insecure:
                    for i in range(self.nodes):
                        self.node_keys[i] = self.register(f"node{i}")
                for i in range(self.nodes):
                    self.start_node(i, wait=False)
                for i in range(self.nodes):
                    self._wait(lambda i=i: port_open(self.node_ports[i]), self.supernodes[i], f"supernode {i}",
                               timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def register(self, name: str, timeout: float = 120.0):
        """A new SuperNode key pair in credentials/, its public key registered with the SuperLink."""
        from .credentials import write_node_key

        key = write_node_key(self.credentials, name)
        done = subprocess.run([_bin("flwr"), "supernode", "register", str(key.public_key), "fedlora"],
                              env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode register {key.public_key} failed: "
                               f"{(done.stdout + done.stderr).strip()[-500:]}")
        return key

    def start_node(self, i: int, wait: bool = True, timeout: float = 120.0,
                   private_key: Path | None = None) -> subprocess.Popen:
        """Start (or restart) the SuperNode of partition i, with its registered key unless
        `private_key` names another (an unregistered node is refused by the SuperLink)."""
        old = self.supernodes.get(i)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"supernode {i} is running (pid {old.pid})")
        if old is not None:  # a restart gets a fresh runtime port (the old one may linger)
            self.node_ports[i] = free_ports(1)[0]
        while len(self.node_ports) <= i:  # a node beyond the federation's (a test's intruder)
            self.node_ports.append(free_ports(1)[0])
        n = self._restarts[i] = self._restarts.get(i, -1) + 1
        cmd = [_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.fleet_port}",
               "--host", "127.0.0.1", "--port", str(self.node_ports[i]),
               "--node-config", f"partition-id={i} num-partitions={self.num_partitions}"]
        if self.insecure:
            cmd.append("--insecure")
        else:
            key = private_key or self.node_keys[i].private_key
            cmd += ["--root-certificates", str(self.tls.ca_cert), "--auth-supernode-private-key", str(key)]
        self.supernodes[i] = proc = self._popen(cmd, f"supernode{i}" + (f".{n}" if n else "") + ".log")
        if wait:
            self._wait(lambda: port_open(self.node_ports[i]), proc, f"supernode {i}", timeout)
        return proc

    def kill_node(self, i: int) -> None:
        """Crash the SuperNode of partition i: SIGKILL to it and every process it started."""
        proc = self.supernodes[i]
        _signal([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
        proc.wait(timeout=30)

    @staticmethod
    def _wait(ready, proc, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready within {timeout:.0f}s")
            time.sleep(0.3)

    # ------------------------------------------------------------------ run
    def run_command(self, config: Path, out: Path, *, overrides: list[str] | None = None,
                    round_timeout: float = 600.0, connect_timeout: float = 300.0,
                    app_dir: Path = APP_DIR) -> list[str]:
        app = app_copy(self.workdir / "app", app_dir)
        run_cfg = {"fedlora-config": str(Path(config).resolve()), "out-dir": str(Path(out).resolve()),
                   "overrides": " ".join(overrides or []), "round-timeout": float(round_timeout),
                   "connect-timeout": float(connect_timeout), "overwrite": True}
        cmd = [_bin("flwr"), "run", str(app), "fedlora", "--stream"]
        for k, v in run_cfg.items():
            val = ("true" if v else "false") if isinstance(v, bool) else (repr(v) if isinstance(v, float)
                                                                            else '"' + str(v).replace('"', '\\"') + '"')
            cmd += ["--run-config", f"{k}={val}"]
        if self.simulation:
            # one core per ClientApp actor, as flower_app's local-simulation federation says
            cmd += ["--federation-config", f"num-supernodes={self.nodes} client-resources-num-cpus={self.client_cpus}"]
        return cmd

    def run(self, config: Path, out: Path, *, timeout: float = 1800.0, **kw) -> subprocess.CompletedProcess:
        """`flwr run ... --stream` into `out`; returns when the stream ends (the run finished)."""
        cmd = self.run_command(config, out, **kw)
        proc = self._popen(cmd, "flwr-run.log")
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise RuntimeError(f"flwr run did not finish within {timeout:.0f}s (logs: {self.logs})") from None
        finally:
            stop_process(proc, grace=2.0)
        log = (self.logs / "flwr-run.log").read_text(errors="replace")
        return subprocess.CompletedProcess(cmd, proc.returncode, log, "")

    # ----------------------------------------------------------------- stop
    def stop(self) -> None:
        for i, proc in list(self.supernodes.items()):
            stop_process(proc)
        self.supernodes.clear()
        stop_process(self.superlink)
        self.superlink = None

    def pids(self) -> list[int]:
        return [p.pid for p in [self.superlink, *self.supernodes.values()] if p is not None]

    def __enter__(self) -> "LocalFlower":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def check_result(out: Path, logs: Path | None = None) -> dict:
    import json

    err = Path(out) / "flower_error.txt"
    if err.exists():
        raise InputError(f"flower run failed: {err.read_text().splitlines()[0]}")
    res = Path(out) / "result.json"
    if not res.exists():
        raise RuntimeError(f"flower run produced no {res} (logs: {logs})")
    return json.loads(res.read_text())


def demo(config: Path, out: Path, *, nodes: int | None = None, overrides: list[str] | None = None,
         round_timeout: float = 600.0, workdir: Path | None = None, timeout: float = 3600.0,
         insecure: bool = False) -> dict:
    """`fedlora flower-demo`: SuperLink + one SuperNode per partition (TLS and SuperNode
    authentication unless `insecure`), run, stop everything."""
    from ..config import load_config

    cfg = load_config(config, overrides or [])
    n = cfg.data.num_clients if nodes is None else int(nodes)
    if n != cfg.data.num_clients:
        overrides = [*(overrides or []), f"data.num_clients={n}"]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: run folder exists; remove it or choose another -o")
    flower = LocalFlower(workdir, nodes=n, insecure=insecure)
    ok = False
    try:
        flower.start()
        print(f"superlink pid {flower.superlink.pid} (control 127.0.0.1:{flower.control_port}), "
              f"supernodes pids {[p.pid for p in flower.supernodes.values()]}; logs {flower.logs}; "
              + ("insecure (no TLS, any node admitted)" if insecure else
                 f"TLS and SuperNode authentication, credentials {flower.credentials}"), flush=True)
        done = flower.run(config, out, overrides=overrides, round_timeout=round_timeout, timeout=timeout)
        if done.returncode != 0:
            tail = "\n".join(done.stdout.splitlines()[-5:])
            raise RuntimeError(f"flwr run exited with {done.returncode} (logs: {flower.logs}): {tail}")
        result = check_result(out, flower.logs)
        ok = True
        return result
    finally:
        flower.stop()
        if flower._tmp is not None and ok:  # keep the logs of a failed run
            shutil.rmtree(flower._tmp, ignore_errors=True)
