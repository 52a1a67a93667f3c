"""Tenant networks with real guests, inside a namespace the test creates."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import Mvm, instances_by_state, needs_assets, sh

pytestmark = [pytest.mark.guest, pytest.mark.net, needs_assets("kernel", "nixpkgs-offline", "builtin-flake")]


def in_ns(m: Mvm, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    assert m.ns
    return subprocess.run(["ip", "netns", "exec", m.ns, *argv], capture_output=True, text=True, timeout=timeout)


def ips(m: Mvm, pool: str) -> dict[str, str]:
    return {i["address"]: i["ip"] for i in json.loads(m.ok("instance", "list", pool, "--json").out)}


def test_two_tenants_isolated_nat_and_host_access(gmvm: Mvm) -> None:
    for t in ("red", "blue"):
        gmvm.ok("tenant", "create", t)
        gmvm.ok("pool", "create", f"{t}/web", "--profile", "minimal")
        gmvm.ok("pool", "build", f"{t}/web")
        gmvm.ok("pool", "scale", f"{t}/web", "--running", "2")
    red, blue = ips(gmvm, "red/web"), ips(gmvm, "blue/web")
    (r1, r1ip), (r2, r2ip) = sorted(red.items())
    (b1, b1ip), _ = sorted(blue.items())
    assert len({r1ip, r2ip, *blue.values()}) == 4

    # same tenant: reachable; other tenant: not
    assert sh(gmvm, r1, f"ping -c 1 -W 3 {r2ip}").rc == 0
    assert sh(gmvm, r1, f"ping -c 1 -W 2 {b1ip}").rc != 0
    assert sh(gmvm, b1, f"ping -c 1 -W 2 {r1ip}").rc != 0
    # the guest's address came from the kernel command line
    assert f"inet {r1ip}/24" in sh(gmvm, r1, "ip -4 addr show eth0").out

    # host -> a TCP service in a guest
    sh(gmvm, r1, "mkdir -p /tmp/www && echo hello-from-red > /tmp/www/index.html && httpd -p 8080 -h /tmp/www")
    r = in_ns(gmvm, "curl", "-sS", "--max-time", "10", f"http://{r1ip}:8080/")
    assert r.stdout == "hello-from-red\n", r.stderr

    # sleep -> wake keeps the address, and it answers
    gmvm.ok("instance", "sleep", r1)
    assert in_ns(gmvm, "busybox", "ping", "-c", "1", "-W", "1", r1ip).returncode != 0
    gmvm.ok("instance", "wake", r1)
    assert ips(gmvm, "red/web")[r1] == r1ip
    assert in_ns(gmvm, "busybox", "ping", "-c", "1", "-W", "3", r1ip).returncode == 0
    assert in_ns(gmvm, "curl", "-sS", "--max-time", "10", f"http://{r1ip}:8080/").stdout == "hello-from-red\n"
    # stop -> start keeps it too
    gmvm.ok("instance", "stop", r2)
    gmvm.ok("instance", "start", r2)
    assert ips(gmvm, "red/web")[r2] == r2ip
    assert sh(gmvm, r1, f"ping -c 1 -W 3 {r2ip}").rc == 0

    v = gmvm.ok("net", "verify")
    assert "matches" in v.out

    # everything destroyed: no mvm bridge, TAP or nftables table remains
    gmvm.ok("tenant", "destroy", "red", "--force")
    links = in_ns(gmvm, "ip", "-o", "link").stdout
    assert "mvmbr" in links  # blue still has its network
    gmvm.ok("tenant", "destroy", "blue", "--force")
    links = in_ns(gmvm, "ip", "-o", "link").stdout
    assert "mvmbr" not in links and "mvt" not in links, links
    assert "mvm" not in in_ns(gmvm, "nft", "list", "tables").stdout


def test_verify_reports_and_repairs_drift(gmvm: Mvm) -> None:
    gmvm.ok("tenant", "create", "acme")
    gmvm.ok("pool", "create", "acme/w", "--profile", "minimal")
    gmvm.ok("pool", "build", "acme/w")
    gmvm.ok("pool", "scale", "acme/w", "--running", "1")
    ip = next(iter(ips(gmvm, "acme/w").values()))
    in_ns(gmvm, "nft", "delete", "table", "inet", "mvm")
    r = gmvm("net", "verify")
    assert r.rc != 0 and "missing" in r.out
    gmvm.ok("net", "verify", "--repair")
    assert "matches" in gmvm.ok("net", "verify").out
    assert in_ns(gmvm, "busybox", "ping", "-c", "1", "-W", "3", ip).returncode == 0
    # a network-less pool touches nothing on the host
    gmvm.ok("pool", "create", "acme/offline", "--profile", "minimal", "--network", "none")
    gmvm.ok("pool", "build", "acme/offline")
    gmvm.ok("pool", "scale", "acme/offline", "--running", "1")
    off = instances_by_state(gmvm, "acme/offline")["running"][0]
    assert "eth0" not in sh(gmvm, off, "ip -o link").out
    assert json.loads(gmvm.ok("instance", "info", off, "--json").out)["ip"] is None


def test_full_subnet_and_bad_networks_change_nothing(mvm: Mvm) -> None:
    from mvm.lifecycle import create
    from mvm.model import PoolRef
    from mvm.services import context
    from mvm.store import SqliteStore

    mvm.ok("tenant", "create", "acme", "--max-instances", "400")
    mvm.ok("pool", "create", "acme/w", "--profile", "minimal")
    ctx = context.host(SqliteStore(mvm.home / "mvm.db"))
    for _ in range(252):
        create(ctx, PoolRef("acme", "w"))
    before = mvm.ok("instance", "list", "acme/w", "--json").out
    r = mvm("instance", "create", "acme/w")
    assert r.rc != 0 and len(r.lines) == 1 and "full" in r.err
    assert mvm.ok("instance", "list", "acme/w", "--json").out == before
    taken = json.loads(mvm.ok("tenant", "info", "acme", "--json").out)["subnet"]
    r = mvm("tenant", "create", "other", "--subnet", taken)
    assert r.rc != 0 and len(r.lines) == 1 and "overlap" in r.err
    for bad in ("-1", "4096", "x"):
        r = mvm("tenant", "create", "other", "--net-id", bad)
        assert r.rc != 0 and len(r.lines) == 1, r.err
    assert [t["id"] for t in json.loads(mvm.ok("tenant", "list", "--json").out)] == ["acme"]
