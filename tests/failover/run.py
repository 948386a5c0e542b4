#!/usr/bin/env python3
"""Failover of kvstore's PostgreSQL backend, on a real Patroni cluster.

Starts etcd and three PostgreSQL nodes under Patroni on loopback ports (in a
temporary directory, as the postgres user), with synchronous replication,
then two kvstore servers whose URL names every node, writers through both
servers and a watcher. It faults the primary twice while they write:

- killed: SIGKILL of the primary's Patroni and every PostgreSQL process;
- frozen: SIGSTOP of the same processes, thawed with SIGCONT once the new
  primary has taken writes for a while, so that it wakes up as a stale
  primary.

Then it checks that every acknowledged write is present with its version,
that no revision went backwards, and that the watch delivered every
acknowledged revision once, in order. It prints, per fault, how long each
server answered 503 and Patroni's own failover time.

Last, with asynchronous replication and the replicas' WAL stalled before the
fault, it kills the primary again and prints how many acknowledged writes
were lost (not asserted: that is what asynchronous replication trades).

Usage: run.py [--kvstore PATH]   (as root; needs patroni, etcd, PostgreSQL)
"""

import argparse
import glob
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

WRITERS_PER_SERVER = 4
KEYS_PER_WRITER = 20
# Patroni's timing: a primary that stops renewing its leader key loses it
# after TTL seconds (Patroni's defaults are 30/10/10).
TTL, LOOP_WAIT, RETRY_TIMEOUT = 10, 2, 4
CURSOR_SECRET = "failover-test-cursor-secret-0123456789abcdef"
# ETCD_API: Patroni uses etcd's v2 API (`etcd:`), not v3 (`etcd3:`). With
# `etcd3:`, Patroni 3.0.2 (Debian 12's) renews a leader key whose lease
# expired by writing it unconditionally, so a primary thawed after a freeze
# took the leader key back from the standby promoted meanwhile, which was
# then demoted and re-cloned, losing the writes it had acknowledged (seen in
# 2 of 11 runs). The v2 API's compare-and-swap on the key's value refuses it.


def log(*parts):
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


class Failure(Exception):
    pass


def wait_for(what, deadline_s, probe, interval=0.2):
    """Calls probe until it returns something other than None or False, or
    fails after the deadline."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        try:
            result = probe()
            if result is not None and result is not False:
                return result
        except Exception as err:  # noqa: BLE001 - a probe may fail until ready
            last = err
        time.sleep(interval)
    raise Failure(f"timed out after {deadline_s} s waiting for {what} (last error: {last})")


def free_ports(count):
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def http_json(method, url, body=None, timeout=5):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read()
        return json.loads(text) if text else None


def children_of():
    """Maps each pid to its children's pids, from /proc."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.split("/")[2])
        children.setdefault(int(fields[1]), []).append(pid)
    return children


def process_tree(root):
    children, tree, todo = children_of(), [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Cluster:
    """etcd and three Patroni nodes in `root`."""

    def __init__(self, root, pg_bin):
        self.root, self.pg_bin = root, pg_bin
        self.etcd_port, self.etcd_peer = free_ports(2)
        self.pg_ports = free_ports(3)
        self.api_ports = free_ports(3)
        self.names = [f"node{i + 1}" for i in range(3)]
        self.patroni = {}
        self.etcd = None

    def start_etcd(self):
        data = os.path.join(self.root, "etcd")
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer}"
        self.etcd = subprocess.Popen(
            ["etcd", "--name", "etcd", "--data-dir", data,
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"etcd={peer}",
             # Patroni talks to etcd's v2 API (see ETCD_API below).
             "--enable-v2=true"],
            stdout=open(os.path.join(self.root, "etcd.log"), "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_for("etcd", 20, lambda: http_json("GET", f"{client}/health")["health"] == "true")

    def config(self, i, synchronous):
        name, port, api = self.names[i], self.pg_ports[i], self.api_ports[i]
        return f"""scope: kvstore-failover
name: {name}
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd:
  hosts: 127.0.0.1:{self.etcd_port}
bootstrap:
  dcs:
    ttl: {TTL}
    loop_wait: {LOOP_WAIT}
    retry_timeout: {RETRY_TIMEOUT}
    synchronous_mode: {"true" if synchronous else "false"}
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_log_hints: "on"
        wal_keep_size: 256MB
        max_connections: 100
        shared_buffers: 32MB
  initdb:
    - encoding: UTF8
  pg_hba:
    - local all all trust
    - host replication all 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{port}
  connect_address: 127.0.0.1:{port}
  data_dir: {self.root}/{name}/data
  bin_dir: {self.pg_bin}
  pgpass: {self.root}/{name}/pgpass
  remove_data_directory_on_rewind_failure: true
  remove_data_directory_on_diverged_timelines: true
  authentication:
    superuser:
      username: postgres
    replication:
      username: replicator
  parameters:
    unix_socket_directories: {self.root}/{name}
"""

    def write_configs(self, synchronous):
        for i, name in enumerate(self.names):
            os.makedirs(os.path.join(self.root, name), exist_ok=True)
            with open(os.path.join(self.root, name, "patroni.yml"), "w") as f:
                f.write(self.config(i, synchronous))
        shutil.chown(self.root, "postgres", "postgres")
        for path, dirs, files in os.walk(self.root):
            for entry in dirs + files:
                shutil.chown(os.path.join(path, entry), "postgres", "postgres")

    def start_node(self, i):
        name = self.names[i]
        self.patroni[i] = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", "patroni",
             os.path.join(self.root, name, "patroni.yml")],
            stdout=open(os.path.join(self.root, f"{name}.log"), "a"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def node_processes(self, i):
        """Patroni and every PostgreSQL process of node i."""
        pids = set(process_tree(self.patroni[i].pid))
        pidfile = os.path.join(self.root, self.names[i], "data", "postmaster.pid")
        try:
            with open(pidfile) as f:
                pids.update(process_tree(int(f.readline())))
        except (OSError, ValueError):
            pass
        return sorted(pids)

    def members(self):
        """Patroni's view of the cluster, from any node that answers."""
        for api in self.api_ports:
            try:
                return http_json("GET", f"http://127.0.0.1:{api}/cluster", timeout=2)["members"]
            except (OSError, ValueError, KeyError):
                continue
        return []

    def leader(self, exclude=None):
        for member in self.members():
            if member["role"] == "leader" and member["state"] == "running" \
                    and member["name"] != exclude:
                return self.names.index(member["name"])
        return None

    def healthy(self, synchronous):
        """A leader and two streaming replicas (one synchronous when asked)."""
        members = self.members()
        roles = sorted(m["role"] for m in members if m["state"] in ("running", "streaming"))
        want = ["leader", "replica", "sync_standby"] if synchronous else ["leader", "replica", "replica"]
        lag_ok = all(isinstance(m.get("lag", 0), int) and m.get("lag", 0) < 1 << 20
                     for m in members if m["role"] != "leader")
        return roles == want and lag_ok

    def rejoined(self, i):
        """Node i runs again as a standby of another leader."""
        return any(m["name"] == self.names[i] and m["role"] in ("replica", "sync_standby")
                   and m["state"] in ("running", "streaming") for m in self.members())

    def patch_config(self, changes):
        leader = self.leader()
        http_json("PATCH", f"http://127.0.0.1:{self.api_ports[leader]}/config", changes)

    def url(self):
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.pg_ports)
        return f"postgres://postgres@{hosts}/postgres?target_session_attrs=read-write"

    def stop(self):
        for i in list(self.patroni):
            signal_all(self.node_processes(i), signal.SIGCONT)
            signal_all(self.node_processes(i), signal.SIGKILL)
        if self.etcd:
            self.etcd.kill()


class Server:
    def __init__(self, binary, root, name, url):
        self.port = free_ports(1)[0]
        self.name = name
        env = dict(os.environ, KVSTORE_CURSOR_SECRET=CURSOR_SECRET, RUST_LOG="warn")
        self.process = subprocess.Popen(
            [binary, "serve", "--backend", "postgres", "--postgres-url", url,
             "--listen", f"127.0.0.1:{self.port}"],
            stdout=open(os.path.join(root, f"{name}.log"), "w"), stderr=subprocess.STDOUT,
            env=env, start_new_session=True)

    def base(self):
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self):
        def ready():
            with urllib.request.urlopen(self.base() + "/readyz", timeout=2) as r:
                return r.status == 200
        wait_for(f"{self.name} to be ready", 60, ready)

    def stop(self):
        self.process.kill()


class Writer(threading.Thread):
    """Writes its own keys round robin and records every answer."""

    def __init__(self, server, index, stop):
        super().__init__(daemon=True)
        self.server, self.index, self.stop = server, index, stop
        self.acks = []  # (time, key, value, version, revision)
        self.failures = []  # (time, status or error text)
        self.seq = 0

    def run(self):
        conn = None
        while not self.stop.is_set():
            key = f"{self.server.name}-w{self.index}-k{self.seq % KEYS_PER_WRITER}"
            value = f"{self.server.name}-w{self.index}-{self.seq}"
            self.seq += 1
            started = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=40)
                conn.request("PUT", f"/v1/kv/{key}", json.dumps({"value": value}),
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                body = response.read()
                if response.status in (200, 201):
                    answer = json.loads(body)
                    self.acks.append((time.monotonic(), key, value,
                                      answer["version"], answer["revision"]))
                else:
                    self.failures.append((started, response.status, body[:200]))
                    time.sleep(0.05)
            except (OSError, http.client.HTTPException) as err:
                self.failures.append((started, "io", str(err)[:200]))
                conn = None
                time.sleep(0.05)


class Watcher(threading.Thread):
    """Follows /v1/watch from the start, reconnecting with Last-Event-ID."""

    def __init__(self, server, stop):
        super().__init__(daemon=True)
        self.server, self.stop = server, stop
        self.changes = []  # (time, revision)
        self.progress = []
        self.last = 0
        self.reconnects = 0
        self.compacted = False

    def run(self):
        while not self.stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=15)
                conn.request("GET", f"/v1/watch?from_revision={self.last + 1}")
                response = conn.getresponse()
                if response.status != 200:
                    response.read()
                    time.sleep(0.2)
                    continue
                fields = {}
                while not self.stop.is_set():
                    line = response.readline()
                    if not line:
                        break
                    line = line.decode().rstrip("\n")
                    if line:
                        name, _, value = line.partition(":")
                        fields[name] = value.lstrip(" ")
                        continue
                    event, revision = fields.get("event"), fields.get("id")
                    fields = {}
                    if event == "change":
                        self.changes.append((time.monotonic(), int(revision)))
                        self.last = int(revision)
                    elif event == "progress":
                        self.last = max(self.last, int(revision))
                    elif event == "compacted":
                        self.compacted = True
                conn.close()
            except (OSError, http.client.HTTPException, ValueError):
                pass
            if not self.stop.is_set():
                self.reconnects += 1
                time.sleep(0.2)


class Run:
    def __init__(self, cluster, servers):
        self.cluster, self.servers = cluster, servers
        self.stop_writers, self.stop_watcher = threading.Event(), threading.Event()
        self.writers = [Writer(s, i, self.stop_writers)
                        for s in servers for i in range(WRITERS_PER_SERVER)]
        self.watcher = Watcher(servers[0], self.stop_watcher)

    def start(self):
        self.watcher.start()
        for w in self.writers:
            w.start()

    def finish(self):
        """Stops the writers, lets the watcher catch up with the last
        acknowledged revision, and stops it."""
        self.stop_writers.set()
        for w in self.writers:
            w.join(timeout=45)
        last = max((a[4] for w in self.writers for a in w.acks), default=0)
        try:
            wait_for("the watch to catch up", 30, lambda: self.watcher.last >= last)
        finally:
            self.stop_watcher.set()
            self.watcher.join(timeout=20)

    def acks_after(self, server, t):
        return [a for w in self.writers if w.server is server for a in w.acks if a[0] > t]

    def wait_writes(self, what, since, deadline=60):
        """Waits until every server has acknowledged writes made after `since`."""
        return wait_for(what, deadline, lambda: all(
            self.acks_after(s, since) for s in self.servers))

    def outage(self, server, t_fault, t_end):
        """The longest time without an acknowledged write on `server` between
        the fault and `t_end`, and the failed answers in that time."""
        acks = [t_fault] + sorted(a[0] for w in self.writers if w.server is server
                                  for a in w.acks if t_fault < a[0] <= t_end)
        gap, start = max((b - a, a) for a, b in zip(acks, acks[1:]))
        statuses = {}
        for w in self.writers:
            for f in w.failures:
                if w.server is server and start <= f[0] <= start + gap:
                    statuses[f[1]] = statuses.get(f[1], 0) + 1
        return gap, statuses

    def watch_stopped(self, t_fault, t_back):
        """The longest time without a change delivered to the watch from the
        fault to its first change after the writes resumed at `t_back`."""
        deadline = time.monotonic() + 30
        while not any(t > t_back for t, _ in self.watcher.changes):
            if time.monotonic() > deadline:
                raise Failure("the watch delivered nothing after the writes resumed")
            time.sleep(0.1)
        later = [t for t, _ in self.watcher.changes if t > t_fault]
        first_after = min(t for t in later if t > t_back)
        times = [t_fault] + [t for t in later if t <= first_after]
        return max(b - a for a, b in zip(times, times[1:]))


def fault(run, cluster, kind, results, synchronous=True):
    old = wait_for("a leader", 30, cluster.leader)
    wait_for("a healthy cluster", 90, lambda: cluster.healthy(synchronous))
    time.sleep(3)
    procs = cluster.node_processes(old)
    log(f"{kind}: primary {cluster.names[old]} ({len(procs)} processes)")
    t_fault = time.monotonic()
    signal_all(procs, signal.SIGKILL if kind == "killed" else signal.SIGSTOP)
    new = wait_for("a new leader", 60, lambda: cluster.leader(exclude=cluster.names[old]),
                   interval=0.1)
    t_promoted = time.monotonic()
    log(f"{kind}: {cluster.names[new]} promoted after {t_promoted - t_fault:.1f} s")
    run.wait_writes(f"writes after the {kind} fault", t_promoted)
    t_back = time.monotonic()
    if kind == "frozen":
        # Let the new primary take writes, then wake the old one up stale.
        time.sleep(5)
        signal_all(cluster.node_processes(old), signal.SIGCONT)
        log(f"{kind}: thawed {cluster.names[old]}")
    else:
        cluster.start_node(old)
    run.wait_writes(f"writes after the {kind} node returned", time.monotonic())
    wait_for(f"{cluster.names[old]} to rejoin", 90, lambda: cluster.rejoined(old))
    if cluster.leader() != new:
        raise Failure(f"{cluster.names[old]} took the leadership back from {cluster.names[new]}")
    outage = {s.name: run.outage(s, t_fault, t_back) for s in run.servers}
    results.append({
        "fault": kind,
        "patroni_failover_s": round(t_promoted - t_fault, 1),
        "writes_stopped_s": {n: round(o[0], 1) for n, o in outage.items()},
        "answers_meanwhile": {n: o[1] for n, o in outage.items()},
        "watch_stopped_s": round(run.watch_stopped(t_fault, t_back), 1),
    })
    log(f"{kind}: {results[-1]}")


def final_state(server, keys):
    state = {}
    for key in keys:
        try:
            state[key] = http_json("GET", f"{server.base()}/v1/kv/{key}")
        except urllib.error.HTTPError as err:
            if err.code != 404:
                raise
            state[key] = None
    return state


def lost_writes(run, server):
    """Acknowledged writes that the store no longer holds: per key, an
    acknowledged version above the one it has now, or the same version with
    another value."""
    last = {}
    for w in run.writers:
        for ack in w.acks:
            key = ack[1]
            if key not in last or ack[3] > last[key][3]:
                last[key] = ack
    state = final_state(server, sorted(last))
    lost = []
    for key, (_, _, value, version, revision) in last.items():
        entry = state[key]
        if entry is None or entry["version"] < version or \
                (entry["version"] == version and
                 (entry["value"] != value or entry["revision"] != revision)):
            lost.append((key, version, revision, entry))
    return lost


def check(run):
    problems = []
    for w in run.writers:
        bad = [f for f in w.failures if f[1] not in (503, "io")]
        if bad:
            problems.append(f"writer {w.server.name}/{w.index}: answers other than 503: {bad[:3]}")
        revisions = [a[4] for a in w.acks]
        if any(b <= a for a, b in zip(revisions, revisions[1:])):
            problems.append(f"writer {w.server.name}/{w.index}: a revision went backwards")
        versions = {}
        for _, key, _, version, _ in w.acks:
            if version <= versions.get(key, 0):
                problems.append(f"{key}: version {version} after {versions[key]}")
            versions[key] = version
    lost = lost_writes(run, run.servers[1])
    if lost:
        problems.append(f"{len(lost)} acknowledged writes lost, e.g. {lost[:3]}")
    watched = [r for _, r in run.watcher.changes]
    if run.watcher.compacted:
        problems.append("the watch was compacted")
    if any(b <= a for a, b in zip(watched, watched[1:])):
        problems.append("the watch delivered a revision out of order or twice")
    missing = {a[4] for w in run.writers for a in w.acks} - set(watched)
    if missing:
        problems.append(f"the watch missed {len(missing)} acknowledged revisions, "
                        f"e.g. {sorted(missing)[:5]}")
    acked = sum(len(w.acks) for w in run.writers)
    return acked, problems


def asynchronous_loss(cluster, binary, root):
    """Kills the primary after its replicas stopped receiving WAL; gives how
    many acknowledged writes were lost."""
    cluster.patch_config({"synchronous_mode": False,
                          # Promote the stalled replica anyway: that is the
                          # case to measure.
                          "maximum_lag_on_failover": 1 << 40})
    wait_for("asynchronous replication", 60, lambda: cluster.healthy(False))
    servers = [Server(binary, root, f"async{i}", cluster.url()) for i in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        run = Run(cluster, servers)
        run.start()
        time.sleep(3)
        old = cluster.leader()
        # The primary's walsenders stop sending: from now on the replicas
        # receive nothing of what the primary commits (and acknowledges).
        senders = [p for p in cluster.node_processes(old)
                   if b"walsender" in open(f"/proc/{p}/cmdline", "rb").read()]
        signal_all(senders, signal.SIGSTOP)
        t_stall = time.monotonic()
        time.sleep(2)
        # The writers stop before the fault, so that the final state tells
        # exactly which acknowledged writes survived.
        run.stop_writers.set()
        for w in run.writers:
            w.join(timeout=45)
        run.stop_watcher.set()
        t_fault = time.monotonic()
        signal_all(cluster.node_processes(old), signal.SIGKILL)
        new = wait_for("a new leader", 60, lambda: cluster.leader(exclude=cluster.names[old]),
                       interval=0.1)
        t_promoted = time.monotonic()
        for s in servers:
            wait_for(f"{s.name} to write again", 60, lambda: http_json(
                "PUT", f"{s.base()}/v1/kv/after-async-failover", {"value": s.name}))
        t_back = time.monotonic()
        acked = [a for w in run.writers for a in w.acks]
        state = final_state(servers[1], sorted({a[1] for a in acked}))
        lost = [a for a in acked if state[a[1]] is None or state[a[1]]["version"] < a[3]]
        result = {
            "fault": "killed, asynchronous, replicas receiving nothing for 2 s",
            "patroni_failover_s": round(t_promoted - t_fault, 1),
            "writes_back_after_s": round(t_back - t_fault, 1),
            "acknowledged": len(acked),
            "acknowledged_while_stalled": sum(1 for a in acked if a[0] > t_stall),
            "acknowledged_lost": len(lost),
        }
        log(f"asynchronous: promoted {cluster.names[new]}; {result}")
        return result
    finally:
        for s in servers:
            s.stop()


def main():
    parser = argparse.ArgumentParser()
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    parser.add_argument("--kvstore", default=os.path.join(target, "debug", "kvstore"))
    args = parser.parse_args()
    binary = os.path.abspath(args.kvstore)
    if os.geteuid() != 0:
        sys.exit("run.py runs as root (Patroni runs as the postgres user)")
    pwd.getpwnam("postgres")
    pg_bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]))
    if not pg_bins or not shutil.which("patroni") or not shutil.which("etcd"):
        sys.exit("run.py needs PostgreSQL (/usr/lib/postgresql/*/bin), patroni and etcd")
    pg_bin = pg_bins[-1]
    root = tempfile.mkdtemp(prefix="kvstore-failover-")
    cluster = Cluster(root, pg_bin)
    servers = []
    started = time.monotonic()

    failed = True

    def cleanup():
        for s in servers:
            s.stop()
        cluster.stop()
        if failed:
            log(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        cluster.start_etcd()
        cluster.write_configs(synchronous=True)
        for i in range(3):
            cluster.start_node(i)
            if i == 0:
                wait_for("the first node to bootstrap", 60, cluster.leader)
        wait_for("a healthy synchronous cluster", 120, lambda: cluster.healthy(True))
        log(f"cluster up: {cluster.url()}")
        servers.extend(Server(binary, root, f"server{i}", cluster.url()) for i in range(2))
        for s in servers:
            s.wait_ready()
        run = Run(cluster, servers)
        run.start()
        results = []
        fault(run, cluster, "killed", results)
        fault(run, cluster, "frozen", results)
        time.sleep(2)
        run.finish()
        acked, problems = check(run)
        log(f"{acked} writes acknowledged, watch reconnected {run.watcher.reconnects} times")
        for s in servers:
            s.stop()
        servers.clear()
        results.append(asynchronous_loss(cluster, binary, root))
        print(json.dumps(results, indent=2))
        log(f"took {time.monotonic() - started:.0f} s")
        if problems:
            for p in problems:
                log("FAIL:", p)
            return 1
        failed = False
        log("ok: no acknowledged write lost, no revision backwards, the watch missed nothing")
        return 0
    except Failure as err:
        log("FAIL:", err)
        for name in cluster.names:
            path = os.path.join(root, f"{name}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    log(f"last lines of {name}'s Patroni log:\n" + "".join(f.readlines()[-10:]))
        return 1
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
