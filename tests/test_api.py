"""The agent's REST API on the fake runtime (DOUBLE: tests/doubles/fake_runtime.py): in
process through FastAPI's TestClient, and served by uvicorn on a Unix socket (and TCP) to the
real CLI, which runs on the same double through the test seam MVM_TEST_RUNTIME (`FakeRuntime.seam`).

The CLI prints the same whether it acts directly or through the agent (`--agent`); a TCP
request without the token and a Unix-socket request from a non-root user are refused;
schemathesis finds no 500 and no response outside the served schema; `/metrics` parses; an
exec through the API brings a warm or sleeping instance back first."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from mvm.api.app import create_app
from mvm.lifecycle import specs
from mvm.model import Action, Pool, Revision, State
from mvm.services import tenants
from tests.conftest import REPO, Result
from tests.doubles.fake_runtime import FakeRuntime
from tests.test_lifecycle_faults import World

REV = "abc123"


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.delenv("MVM_HOME", raising=False)
    monkeypatch.delenv("MVM_AGENT", raising=False)
    monkeypatch.setenv("MVM_RUNTIME_DIR", "/nonexistent-mvm-runtime-dir")
    w = World(tmp_path)
    tenants.create(w.ctx, "acme")
    w.ctx.store.add_pool(Pool("acme", "w", "path:/nonexistent", "p", 1, 128, data_disk=8, network="none"))
    w.ctx.store.add_revision(Revision("acme", "w", REV, "/nix/store/x-fake", {"closure_size": 3 << 20}, 1.7e9))
    w.ctx.store.set_pool_current("acme", "w", REV)
    rdir = w.ctx.layout.revision_dir("acme", "w", REV)
    rdir.mkdir(parents=True)
    for f in ("rootfs.ext4", "vmlinux", "manifest.json"):
        (rdir / f).write_bytes(b"fake")
    yield w
    for i in w.ctx.store.instances():
        FakeRuntime(w.ledger).stop(specs.control_spec(w.ctx.layout, i), 0)


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(create_app(world.host)) as c:
        yield c


def env_of(world: World) -> dict[str, str]:
    return dict(os.environ, MVM_HOME=str(world.root / "home"), MVM_RUNTIME_DIR=str(world.root / "run"),
                MVM_TEST_RUNTIME=FakeRuntime.seam(world.ledger), COLUMNS="200", NO_COLOR="1",
                PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))


class Served:
    """`python -m mvm.api.server` on the world's home, as the agent would serve it."""

    def __init__(self, world: World, *args: str, sock: Path | None = None) -> None:
        self.world = world
        self.socket = sock or world.root / "agent" / "api.sock"
        self.proc = subprocess.Popen([sys.executable, "-m", "mvm.api.server", "--socket", str(self.socket), *args],
                                     env=env_of(world), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        err = self.proc.stderr.read() if self.proc.stderr and not line else ""
        assert line == "ready\n", f"server did not start: {line!r} {err}"

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://agent",
                            timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


@pytest.fixture
def served(world: World) -> Iterator[Served]:
    s = Served(world)
    yield s
    s.stop()


def cli(world: World, *args: str, agent: Path | None = None, env: dict[str, str] | None = None) -> Result:
    argv = [sys.executable, "-m", "mvm.cli.main", *(["--agent", str(agent)] if agent else []), *args]
    p = subprocess.run(argv, capture_output=True, text=True, env={**env_of(world), **(env or {})}, timeout=300,
                       stdin=subprocess.DEVNULL)
    return Result(p.returncode, p.stdout, p.stderr)


def errors_of(r: Result) -> list[str]:
    return [ln for ln in r.err.splitlines() if ln.startswith("error:")]


def wait_op(c: TestClient | httpx.Client, op: dict[str, object]) -> dict[str, object]:
    deadline = time.monotonic() + 300
    while op["status"] == "running":
        assert time.monotonic() < deadline, op
        time.sleep(0.05)
        op = c.get(f"/operations/{op['id']}").json()
    return op


# -- the API and the CLI agree ------------------------------------------------------

def test_cli_prints_the_same_through_the_agent(world: World, served: Served) -> None:
    sock = served.socket
    r = cli(world, "pool", "scale", "acme/w", "--running", "2", "--warm", "1", agent=sock)
    assert (r.rc, r.out) == (0, "acme/w: running=2 warm=1 sleeping=0\n"), r.err
    direct = cli(world, "pool", "scale", "acme/w", "--running", "2", "--warm", "1", "--json")
    assert direct.rc == 0 and len(json.loads(direct.out)) == 3
    again = cli(world, "pool", "scale", "acme/w", "--running", "2", "--warm", "1", "--json", agent=sock)
    assert again.out == direct.out
    views = json.loads(cli(world, "instance", "list", "acme/w", "--json").out)
    warm = next(v["address"] for v in views if v["state"] == "warm")
    running = next(v["address"] for v in views if v["state"] == "running")
    assert cli(world, "instance", "exec", running, "--", "write", "hello", agent=sock).rc == 0
    seen: list[tuple[int, int, int]] = []
    for args in (("tenant", "list"), ("tenant", "list", "--json"), ("tenant", "info", "acme"),
                 ("tenant", "info", "acme", "--json"), ("pool", "list"), ("pool", "list", "acme", "--json"),
                 ("pool", "info", "acme/w"), ("pool", "info", "acme/w", "--json"),
                 ("pool", "revisions", "acme/w"), ("pool", "revisions", "acme/w", "--json"),
                 ("instance", "list"), ("instance", "list", "acme", "--json"),
                 ("instance", "info", warm), ("instance", "info", running, "--json"),
                 ("instance", "exec", running, "--", "read"),
                 ("instance", "exec", running, "--json", "--", "nope"),
                 ("events",), ("events", "acme", "-n", "5", "--json"),
                 # refusals: the same line and exit code
                 ("tenant", "info", "nope"), ("pool", "info", "acme/nope"), ("instance", "list", "Bad"),
                 ("instance", "resume", running), ("instance", "exec", warm, "--timeout", "0", "--", "read"),
                 ("pool", "rollback", "acme/w"), ("events", "nope")):
        here, there = cli(world, *args), cli(world, *args, agent=sock)
        assert (there.rc, there.out, errors_of(there)) == (here.rc, here.out, errors_of(here)), args
        seen.append((here.rc, len(here.out.splitlines()), len(errors_of(here))))
    assert seen[:15] == [(0, n, 0) for _, n, _ in seen[:15]] and seen[15][0] == 127, seen
    assert [rc for rc, _, _ in seen[16:18]] == [0, 0], seen
    assert all(rc not in (0, 127) and n == 0 and e == 1 for rc, n, e in seen[18:]), seen
    assert min(n for _, n, _ in seen[:15]) >= 1
    # MVM_AGENT does what --agent does
    r = cli(world, "tenant", "create", "other", env={"MVM_AGENT": str(sock)})
    assert errors_of(r) == ["error: `mvm tenant create` does not go through the agent "
                            "(run it without --agent / MVM_AGENT, on the agent's host)"]
    # a transition through the agent prints what a direct one prints
    assert cli(world, "instance", "warm", running, agent=sock).out == f"{running}: warm\n"
    assert cli(world, "instance", "resume", running).out == f"{running}: running\n"
    # what does not go through the agent says so in one line
    r = cli(world, "tenant", "create", "other", agent=sock)
    assert (r.rc, errors_of(r)) == (2, ["error: `mvm tenant create` does not go through the agent "
                                        "(run it without --agent / MVM_AGENT, on the agent's host)"])
    assert cli(world, "tenant", "list", "--json").out.count('"id"') == 1
    # an agent that is not there: one line
    r = cli(world, "tenant", "list", agent=world.root / "none.sock")
    assert r.rc == 1 and errors_of(r)[0].startswith("error: cannot reach the agent at "), r.err


def test_the_api_answers_as_the_cli_acts(client: TestClient, world: World) -> None:
    assert [t["id"] for t in client.get("/tenants").json()] == ["acme"]
    r = client.post("/tenants", json={"id": "beta", "quotas": {"max_running": 1}})
    assert r.status_code == 201 and r.json()["quotas"]["max_running"] == 1
    assert world.ctx.store.tenant("beta").quotas.max_running == 1
    r = client.post("/tenants", json={"id": "beta"})
    assert (r.status_code, r.json()) == (409, {"error": "tenant 'beta' already exists", "exit_code": 4,
                                               "hint": "see `mvm tenant info beta`", "kind": "Conflict"})
    r = client.get("/tenants/Nope")
    assert r.status_code == 422 and r.json()["error"] == "invalid tenant ID 'Nope'"
    assert client.get("/tenants/nope").status_code == 404
    r = client.post("/tenants/acme/pools/w/scale", json={"running": -1})
    assert r.status_code == 422 and r.json()["kind"] == "InvalidInput"
    # scale is an operation: 202, then its progress and result
    r = client.post("/tenants/acme/pools/w/scale", json={"running": 1, "sleeping": 1})
    assert r.status_code == 202 and r.json()["status"] == "running"
    op = wait_op(client, r.json())
    assert op["status"] == "succeeded", op
    assert sorted(i["state"] for i in op["result"]) == ["running", "sleeping"]  # type: ignore[union-attr]
    assert any("created" in line for line in op["progress"])  # type: ignore[union-attr]
    assert sorted(i.state.value for i in world.ctx.store.instances("acme", "w")) == ["running", "sleeping"]
    # a refusal inside an operation is its error, and nothing changed
    op = wait_op(client, client.post("/tenants/acme/pools/w/scale", json={"running": 99}).json())
    assert op["status"] == "failed", op  # (by the quota, or by the host's memory first)
    assert op["error"]["kind"] in ("QuotaExceeded", "AdmissionRefused"), op  # type: ignore[index]
    assert len(world.ctx.store.instances("acme", "w")) == 2
    # pools: made and their idle policy changed as the CLI does
    flake = world.root / "flake"
    flake.mkdir()
    (flake / "flake.nix").write_text("{ outputs = _: { }; }\n")
    r = client.post("/tenants/beta/pools", json={"id": "p", "flake": str(flake), "profile": "x",
                                                 "idle_warm": "30s", "min_running": 1})
    assert r.status_code == 201 and (r.json()["idle_warm"], r.json()["min_running"]) == (30, 1), r.json()
    r = client.patch("/tenants/beta/pools/p", json={"idle_sleep": "5m", "pinned": True})
    assert (r.json()["idle_warm"], r.json()["idle_sleep"], r.json()["pinned"]) == (30, 300, True), r.json()
    r = client.patch("/tenants/beta/pools/p", json={"idle_warm": "soon"})
    assert r.status_code == 422 and world.ctx.store.pool("beta", "p").idle_warm == 30, r.json()
    # a build is an operation too; one whose flake is not there fails with the CLI's line
    op = wait_op(client, client.post("/tenants/acme/pools/w/build", json={"builder": "host"}).json())
    assert op["status"] == "failed" and op["kind"] == "build", op
    assert op["error"]["error"] == "no flake at '/nonexistent': /nonexistent/flake.nix does not exist", op
    assert world.ctx.store.pool("acme", "w").current == REV
    r = client.post("/tenants/acme/pools/w/build", json={"builder_cpus": 0})
    assert (r.status_code, r.json()["error"]) == (422, "--builder-cpus must be between 1 and 8 (got 0)")
    # transitions, and an illegal one refused with the table's hint
    iid = next(i.id for i in world.ctx.store.instances("acme", "w") if i.state is State.RUNNING)
    base = f"/tenants/acme/pools/w/instances/{iid}"
    assert client.post(f"{base}/actions/warm").json() == {"address": f"acme/w/{iid}", "state": "warm"}
    r = client.post(f"{base}/actions/warm")
    assert (r.status_code, r.json()["error"]) == (409, "cannot warm instance: it is warm")
    assert client.post(f"{base}/actions/fly").status_code == 422
    assert client.get(base).json()["state"] == "warm"
    assert client.post(f"{base}/actions/destroy").json()["state"] == "destroyed"
    assert client.get(base).status_code == 404
    assert client.get("/operations/op-nope").status_code == 404
    doc = client.get("/openapi.json").json()
    assert "/tenants/{tenant}/pools/{pool}/scale" in doc["paths"]


def test_exec_through_the_api_brings_an_instance_back(client: TestClient, world: World) -> None:
    warm, sleeping = world.new(State.RUNNING), world.new(State.RUNNING)
    world.guest(sleeping, "write", "before-sleep")
    from mvm.lifecycle import apply

    apply(world.ctx, warm, Action.WARM)
    apply(world.ctx, sleeping, Action.SLEEP)
    for ref, back in ((warm, "resume"), (sleeping, "wake")):
        r = client.post(f"/tenants/acme/pools/w/instances/{ref.instance}/exec", json={"argv": ["read"]})
        assert r.status_code == 200, r.json()
        assert r.json()["brought_back"] == back and r.json()["exit_code"] == 0
        assert world.instance(ref).state is State.RUNNING
    assert base64.b64decode(r.json()["stdout_b64"]) == b"before-sleep\n"
    reasons = {(e["instance"], e["kind"]): e["reason"] for e in world.ctx.store.events("acme")}
    assert reasons[(warm.instance, "instance.resume")] == "work"
    assert reasons[(sleeping.instance, "instance.wake")] == "work"
    # bad input wakes nothing
    apply(world.ctx, warm, Action.WARM)
    r = client.post(f"/tenants/acme/pools/w/instances/{warm.instance}/exec", json={"argv": ["read"], "timeout": 0})
    assert r.status_code == 422 and world.instance(warm).state is State.WARM


def test_the_cli_without_an_agent_refuses_exec_on_a_sleeping_instance(world: World) -> None:
    ref = world.new(State.SLEEPING)
    r = cli(world, "instance", "exec", str(ref), "--", "read")
    assert (r.rc, errors_of(r)) == (125, [f"error: cannot exec in {ref}: it is sleeping (wake it first: `mvm instance "
                                        f"wake {ref}`, or exec through the agent (`--agent`), which wakes it)"])
    assert world.instance(ref).state is State.SLEEPING


def test_metrics_parse_and_carry_the_series_after_a_scale(client: TestClient, world: World) -> None:
    op = wait_op(client, client.post("/tenants/acme/pools/w/scale", json={"running": 2, "warm": 1}).json())
    assert op["status"] == "succeeded", op
    op = wait_op(client, client.post("/tenants/acme/pools/w/scale", json={"running": 99}).json())
    assert op["status"] == "failed", op  # (a refusal: pool.scale-refused, reason quota)
    from mvm.lifecycle import apply
    from mvm.model import Reason

    running = next(i for i in world.ctx.store.instances("acme", "w") if i.state is State.RUNNING)
    apply(world.ctx, running.ref, Action.SLEEP, reason=Reason.POLICY)  # (as the idle policy moves one)
    text = client.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    inst = {(s.labels["tenant"], s.labels["pool"], s.labels["state"]): s.value
            for s in fams["mvm_instances"].samples}
    assert (inst[("acme", "w", "running")], inst[("acme", "w", "warm")], inst[("acme", "w", "sleeping")],
            inst[("acme", "w", "failed")]) == (1, 1, 1, 0)

    def values(name: str, **labels: str) -> dict[str, float]:
        return {s.name: s.value for s in fams[name].samples if labels.items() <= s.labels.items()}

    boots = values("mvm_transition_seconds", action="boot")
    assert boots["mvm_transition_seconds_count"] == 3 and boots["mvm_transition_seconds_sum"] > 0, boots
    assert values("mvm_transition_seconds", action="sleep")["mvm_transition_seconds_count"] == 1
    assert values("mvm_transition_seconds", action="wake")["mvm_transition_seconds_count"] == 0
    assert values("mvm_build_seconds")["mvm_build_seconds_count"] == 0
    assert values("mvm_admission_refusals")["mvm_admission_refusals_total"] == 1
    assert values("mvm_idle_moves")["mvm_idle_moves_total"] == 1
    assert values("mvm_reconcile_errors")["mvm_reconcile_errors_total"] == 0
    # the events table is read incrementally: a second scrape counts nothing twice
    again = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert {s.name: s.value for s in again["mvm_admission_refusals"].samples} == \
        {s.name: s.value for s in fams["mvm_admission_refusals"].samples}
    assert {s.name: s.value for s in again["mvm_transition_seconds"].samples} == \
        {s.name: s.value for s in fams["mvm_transition_seconds"].samples}


# -- the server: socket, TCP and token, events stream -----------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_needs_the_token(world: World, tmp_path: Path) -> None:
    port = _free_port()
    r = subprocess.run([sys.executable, "-m", "mvm.api.server", "--socket", str(tmp_path / "a.sock"),
                        "--listen", f"127.0.0.1:{port}"], env=env_of(world), capture_output=True, text=True,
                       timeout=120)
    assert (r.returncode, r.stderr) == (2, "error: TCP needs a bearer token (pass --token-file FILE "
                                           "(a file holding the token))\n")
    token = "t0ken-" + os.urandom(16).hex()
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "token").chmod(0o644)
    r = subprocess.run([sys.executable, "-m", "mvm.api.server", "--socket", str(tmp_path / "a.sock"),
                        "--listen", f"127.0.0.1:{port}", "--token-file", str(tmp_path / "token")],
                       env=env_of(world), capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, f"error: the token file {tmp_path / 'token'} is open to other users "
                                           f"(mode 0644) (chmod 600 {tmp_path / 'token'})\n")
    (tmp_path / "token").chmod(0o600)
    s = Served(world, "--listen", f"127.0.0.1:{port}", "--token-file", str(tmp_path / "token"))
    try:
        url = f"http://127.0.0.1:{port}/tenants"
        r1 = httpx.get(url, timeout=60)
        assert r1.status_code == 401 and r1.json()["error"] == "missing or wrong bearer token"
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
        ok = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert ok.status_code == 200 and [t["id"] for t in ok.json()] == ["acme"]
        with s.client() as c:  # the Unix socket needs no token
            assert c.get("/tenants").status_code == 200
    finally:
        s.stop()


def test_serve_in_a_thread_until_told_to_stop(world: World, tmp_path: Path) -> None:
    """How the agent runs it: beside its loop, ended by an event; the socket is removed."""
    from mvm.api.server import serve

    ready, stop = threading.Event(), threading.Event()
    sock = tmp_path / "s" / "api.sock"
    t = threading.Thread(target=serve, args=(world.host,), kwargs={"socket": sock, "on_ready": ready.set,
                                                                   "stop": stop})
    t.start()
    try:
        assert ready.wait(60)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent", timeout=60) as c:
            assert [t["id"] for t in c.get("/tenants").json()] == ["acme"]
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive() and not sock.exists()


NOBODY_GET = ("import socket,sys\n"
              "s=socket.socket(socket.AF_UNIX)\n"
              "try:\n s.connect(sys.argv[1])\n"
              "except OSError as e:\n print('connect', e.errno); sys.exit(0)\n"
              "s.sendall(b'GET /tenants HTTP/1.1\\r\\nhost: x\\r\\n\\r\\n')\n"
              "print(s.recv(65536).split(b'\\r\\n')[0].decode())\n")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may pass through (the tests' tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="mvm-api-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_non_root_user_is_refused_on_the_socket(world: World, open_dir: Path) -> None:
    served = Served(world, sock=open_dir / "agent" / "api.sock")
    try:
        _refused_to_nobody(served)
    finally:
        served.stop()


def _refused_to_nobody(served: Served) -> None:
    sock = served.socket
    assert (sock.stat().st_mode & 0o777, sock.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-I",
                 "-c", NOBODY_GET, str(sock)]
    r = subprocess.run(as_nobody, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "connect 13", r  # EACCES: the directory and the socket are root's
    # the second guard: even on a socket opened to everyone, the peer's uid is checked
    sock.parent.chmod(0o755)
    sock.chmod(0o666)
    r = subprocess.run(as_nobody, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "HTTP/1.1 403 Forbidden", r
    with served.client() as c:  # root still gets in
        assert c.get("/tenants").status_code == 200


def test_events_list_and_stream(world: World, served: Served) -> None:
    with served.client() as c:
        before = c.get("/events", params={"tenant": "acme"}).json()
        assert before and before[-1]["kind"] == "tenant.create"
        last = before[-1]["id"]
        with c.stream("GET", "/events/stream", params={"tenant": "acme", "after": last}) as stream:
            op = wait_op(c, c.post("/tenants/acme/pools/w/scale", json={"running": 1}).json())
            assert op["status"] == "succeeded", op
            seen: list[dict[str, object]] = []
            for line in stream.iter_lines():
                seen.append(json.loads(line))
                if seen[-1]["kind"] == "instance.start" or len(seen) == 10:
                    break
        kinds = [e["kind"] for e in seen]
        assert kinds[-1] == "instance.start" and "instance.create" in kinds, kinds
        assert all(e["id"] > last and e["tenant"] == "acme" for e in seen)  # type: ignore[operator]
        assert [e["id"] for e in seen] == sorted(e["id"] for e in seen)  # type: ignore[type-var]
        after = c.get("/events", params={"after": last, "limit": 1}).json()
        assert [e["id"] for e in after] == [seen[0]["id"]]


# -- property-based: the served schema --------------------------------------------------

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_schemathesis_finds_no_500_and_no_response_off_schema(world: World) -> None:
    # (build starts a real build and the stream never ends: both are shown above)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(world.host)).exclude(
        path_regex=r"/(build|events/stream)$")
    ran: list[str] = []
    ops = [result.ok() for result in schema.get_all_operations()]
    for op in ops:

        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def run(case: schemathesis.Case) -> None:
            ran.append(f"{case.method} {case.path}")
            case.call_and_validate(checks=CHECKS)

        run()
    assert len(set(ran)) == len(ops) >= 19, sorted(set(ran))  # (every operation but the two above)


def test_agent_serve_runs_the_loop_and_the_api_and_leaves_vms_on_sigterm(world: World) -> None:
    """`mvm agent serve` as a user starts it: the API on its default socket, the reconciler
    behind it (a scale through the API is kept), and SIGTERM ends both, VMs left running."""
    sock = world.ctx.layout.agent_socket()
    agent = subprocess.Popen([sys.executable, "-m", "mvm.cli.main", "agent", "serve", "--interval", "1"],
                             env=env_of(world), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()
            time.sleep(0.1)
        r = cli(world, "pool", "scale", "acme/w", "--running", "2", agent=sock)
        assert r.rc == 0 and "running=2" in r.out, r
        listed = json.loads(cli(world, "instance", "list", "acme/w", "--json", agent=sock).out)
        assert sorted(i["state"] for i in listed) == ["running", "running"]
        pids = {i.id: FakeRuntime(world.ledger).pid(specs.control_spec(world.ctx.layout, i))
                for i in world.ctx.store.instances("acme", "w")}
        assert all(pids.values()), pids
    finally:
        agent.send_signal(signal.SIGTERM)
        _out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err
    assert "hypervisors left running" in err and not sock.exists()
    for iid, pid in pids.items():
        assert pid is not None and os.path.exists(f"/proc/{pid}"), f"{iid}'s VM did not outlive the agent"


def test_sigterm_ends_an_events_stream_cleanly_and_the_agent_at_once(world: World) -> None:
    """A client following /events/stream does not hold the agent's exit: SIGTERM ends the
    stream (its response complete, not cut) and the agent, without a traceback."""
    sock = world.ctx.layout.agent_socket()
    agent = subprocess.Popen([sys.executable, "-m", "mvm.cli.main", "agent", "serve", "--interval", "1"],
                             env=env_of(world), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    following = threading.Event()
    ended: list[str] = []

    def follow() -> None:
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent",
                              timeout=60) as c, c.stream("GET", "/events/stream") as stream:
                assert stream.status_code == 200
                following.set()
                for _line in stream.iter_lines():
                    pass
            ended.append("complete")
        except Exception as e:  # (e.g. the connection cut in the middle of the chunked body)
            ended.append(repr(e))
        finally:
            following.set()

    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()
            time.sleep(0.1)
        follower = threading.Thread(target=follow)
        follower.start()
        assert following.wait(60) and not ended, ended
    finally:
        agent.send_signal(signal.SIGTERM)
        _out, err = agent.communicate(timeout=120)
    follower.join(60)
    assert ended == ["complete"]
    assert agent.returncode == 0, err
    assert "Traceback" not in err and "Cancel" not in err, err
    assert err.splitlines()[-1].startswith("agent: stopped after "), err


def test_an_operations_progress_is_bounded() -> None:
    """A build's progress carries what a tenant's flake prints: the agent keeps the newest lines,
    each cut, and says how many it dropped."""
    from mvm.api.app import PROGRESS_KEEP, PROGRESS_LINE, Operation

    op = Operation("op-1", "build", "acme/w")
    for n in range(PROGRESS_KEEP + 5):
        op.line(f"line {n} " + "x" * (PROGRESS_LINE * (n % 2)))
    out = op.out().progress
    assert len(out) == PROGRESS_KEEP + 1
    assert out[0] == "(5 earlier progress lines not kept)"
    assert out[1].startswith("line 5 ") and out[-1].startswith(f"line {PROGRESS_KEEP + 4} ")
    assert max(len(x) for x in out) <= PROGRESS_LINE + len(" …(cut)")
