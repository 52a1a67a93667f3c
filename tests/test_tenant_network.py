"""Tenant networks with real guests, inside a namespace the test creates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Mvm, Templates, instances_by_state, needs_assets, sh

pytestmark = [needs_assets("kernel", "nixpkgs-offline", "builtin-flake")]


def in_ns(m: Mvm, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    assert m.ns
    return subprocess.run(["ip", "netns", "exec", m.ns, *argv], capture_output=True, text=True, timeout=timeout)


def red_and_blue(m: Mvm, root: Path) -> None:
    """Two tenants, each with a built pool of the built-in `minimal` profile (nothing runs)."""
    for t in ("red", "blue"):
        m.ok("tenant", "create", t)
        m.ok("pool", "create", f"{t}/web", "--profile", "minimal")
        m.ok("pool", "build", f"{t}/web")


def ips(m: Mvm, pool: str) -> dict[str, str]:
    return {i["address"]: i["ip"] for i in json.loads(m.ok("instance", "list", pool, "--json").out)}


@pytest.mark.guest
@pytest.mark.net
def test_two_tenants_isolated_nat_and_host_access(gmvm: Mvm, templates: Templates) -> None:
    templates.clone(gmvm, "red-and-blue", red_and_blue)
    for t in ("red", "blue"):
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


@pytest.mark.guest
@pytest.mark.net
def test_verify_reports_and_repairs_drift(gmvm: Mvm) -> None:
    gmvm.ok("tenant", "create", "acme")
    gmvm.ok("pool", "create", "acme/w", "--profile", "minimal")
    gmvm.ok("pool", "build", "acme/w")
    gmvm.ok("pool", "scale", "acme/w", "--running", "1")
    ip = next(iter(ips(gmvm, "acme/w").values()))
    table = next(ln.split()[-1] for ln in in_ns(gmvm, "nft", "list", "tables").stdout.splitlines()
                 if ln.startswith("table inet mvm-"))
    in_ns(gmvm, "nft", "delete", "table", "inet", table)
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
    """(Boots nothing and makes no network: records only.)"""
    from mvm.context.compose import compose
    from mvm.lifecycle import create
    from mvm.model import PoolRef
    from mvm.store import SqliteStore

    mvm.ok("tenant", "create", "acme", "--max-instances", "400")
    mvm.ok("pool", "create", "acme/w", "--profile", "minimal")
    ctx = compose(SqliteStore(mvm.home / "mvm.db"))
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


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000)); s.listen(64); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hello\\n"); c.close()
"""


def _listen(ns: str) -> subprocess.Popen[str]:
    """A TCP service on every address of `ns`, as a careless host service would be."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def _in_echos(ns: str) -> int:
    """ICMP echo requests the namespace (the "host") has received so far."""
    lines = [ln.split() for ln in subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
             capture_output=True, text=True, check=True).stdout.splitlines() if ln.startswith("Icmp:")]
    return int(lines[1][lines[0].index("InEchos")])


@pytest.mark.guest
@pytest.mark.net
def test_guests_find_the_host_closed_and_cannot_spoof(gmvm: Mvm, templates: Templates, tmp_path: Path) -> None:
    templates.clone(gmvm, "red-and-blue", red_and_blue)
    ns = gmvm.ns
    assert ns
    out = f"{ns}-out"
    subprocess.run(["ip", "netns", "add", out], check=True)
    listeners: list[subprocess.Popen[str]] = []
    try:
        # the test's uplink: a LAN (a host network) to `out`, which holds the "internet"
        # beyond the default route and a metadata address
        for argv in (["ip", "link", "add", "vout", "type", "veth", "peer", "name", "voutp"],
                     ["ip", "link", "set", "voutp", "netns", out],
                     ["ip", "addr", "add", "192.168.77.1/24", "dev", "vout"],
                     ["ip", "link", "set", "vout", "up"],
                     ["ip", "route", "add", "default", "via", "192.168.77.2"]):
            assert in_ns(gmvm, *argv).returncode == 0
        for argv in (["ip", "addr", "add", "192.168.77.2/24", "dev", "voutp"],
                     ["ip", "link", "set", "voutp", "up"], ["ip", "link", "set", "lo", "up"],
                     ["ip", "addr", "add", "203.0.113.5/32", "dev", "lo"],
                     ["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", out, *argv], check=True)
        listeners = [_listen(ns), _listen(out)]

        for t in ("red", "blue"):
            gmvm.ok("pool", "scale", f"{t}/web", "--running", "1")
        (red, red_ip), = ips(gmvm, "red/web").items()
        (blue, blue_ip), = ips(gmvm, "blue/web").items()
        red_gw, blue_gw = red_ip.rsplit(".", 1)[0] + ".1", blue_ip.rsplit(".", 1)[0] + ".1"

        probe = "; ".join(f"echo {a}: $(nc -w 8 {a} 8000 </dev/null 2>&1)" for a in
                          (red_gw, blue_gw, "169.254.169.254", "203.0.113.5"))
        seen = dict(ln.split(": ", 1) for ln in sh(gmvm, red, probe).out.splitlines())
        for refused in (red_gw, blue_gw, "169.254.169.254"):
            assert "Connection refused" in seen[refused], seen  # refused at once, no timeout
        assert seen["203.0.113.5"] == "hello", seen  # the outside, through NAT
        assert "Connection refused" in sh(gmvm, blue, f"nc -w 8 {red_gw} 8000 </dev/null 2>&1").out
        # an egress deny list, changed on a live network
        outside = "nc -w 8 203.0.113.5 8000 </dev/null 2>&1"
        gmvm.ok("tenant", "egress", "red", "--deny", "203.0.113.0/24")
        assert "Connection refused" in sh(gmvm, red, outside).out
        assert sh(gmvm, blue, outside).out.strip() == "hello"
        gmvm.ok("tenant", "egress", "red", "--clear")
        assert sh(gmvm, red, outside).out.strip() == "hello"
        before = _in_echos(ns)
        assert sh(gmvm, red, f"ping -c 2 -W 3 {red_gw}").rc == 0  # its own gateway answers
        honest = _in_echos(ns) - before
        assert honest >= 2

        # spoofing: another source IP, then another MAC; the host sees none of it
        spoof_ip = red_ip.rsplit(".", 1)[0] + ".50"
        before = _in_echos(ns)
        sh(gmvm, red, f"ip addr add {spoof_ip}/24 dev eth0; ping -c 3 -W 1 -I {spoof_ip} {red_gw}")
        sh(gmvm, red, f"ip addr del {spoof_ip}/24 dev eth0; ip link set eth0 down; "
                      "ip link set eth0 address 02:00:00:00:00:99; ip link set eth0 up; "
                      f"ping -c 3 -W 1 {red_gw}")
        assert _in_echos(ns) - before == 0

        checks = {c["check"]: c for c in json.loads(gmvm.ok("doctor", "--json").out)}
        assert "held by this home" in checks["firewall"]["detail"]
        assert "2 tenant(s), 2 TAP(s) filtered, 1 host network(s) closed" in checks["firewall"]["detail"]

        # a second state home in this namespace is refused, and destroying its tenant (net-id
        # 0, as red's) leaves red's bridge alone
        other = Mvm(tmp_path / "other-home", ns=ns)
        other.ok("tenant", "create", "intruder")
        r = other("net", "verify", "--repair")
        assert r.rc != 0 and len(r.lines) == 1 and "managed by another mvm state home" in r.err
        other.ok("tenant", "destroy", "intruder")
        assert sh(gmvm, blue, f"ping -c 1 -W 3 {blue_gw}").rc == 0
        assert "matches" in gmvm.ok("net", "verify").out
    finally:
        for p in listeners:
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "del", out], check=False)
