"""A closed host, egress lists and anti-spoofing on a real kernel, with namespaces as guests.

As in test_network_host.py, a test namespace plays the host; "guests" are namespaces on
veth pairs plugged into the tenant bridges, and an "uplink" veth leads to an `out`
namespace that plays the internet beyond the default route (203.0.113.5) and a cloud's
metadata service (169.254.169.254). Each check has a control: with mvm's tables gone the
same traffic gets through, so a refusal is the firewall's doing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from mvm.errors import Conflict
from mvm.lifecycle import netops
from mvm.network import claim, firewall, host, plan
from mvm.util import proc
from tests.test_network_host import Namespaces, _configure_guest, in_netns, ping, plug

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None or shutil.which("ip") is None,
                       reason="needs nft and ip"),
]

FW = firewall.Firewall("mvm-closedtest")
S0, S1 = plan.default_subnet(0), plan.default_subnet(1)
INTERNET, METADATA = "203.0.113.5", "169.254.169.254"


@pytest.fixture
def spaces() -> Iterator[Namespaces]:
    made = Namespaces(f"mvmcl-{uuid.uuid4().hex[:6]}", [])
    try:
        yield made
    finally:
        for name in reversed(made.created):
            proc.run(["ip", "netns", "del", name], check=False)


# -- in-namespace helpers ---------------------------------------------------------------

def _ip(*args: str) -> None:
    proc.run(["ip", *args])


def _uplink(h: str, out: str) -> None:
    """`vout` from the host to `out`: a LAN 192.168.77.0/24 (a host network) and the default
    route; `out` holds the internet and the metadata address on its loopback."""
    plug(h, out, "vout", None)
    in_netns(h, lambda: (_ip("addr", "add", "192.168.77.1/24", "dev", "vout"),
                         _ip("route", "add", "default", "via", "192.168.77.2")))
    in_netns(out, _configure_guest, "voutp", "192.168.77.2", None, None)
    in_netns(out, lambda: (_ip("addr", "add", f"{INTERNET}/32", "dev", "lo"),
                           _ip("addr", "add", f"{METADATA}/32", "dev", "lo")))


def _guest(spaces: Namespaces, h: str, net_id: int, subnet: IPv4Network, index: int,
           port: str | None = None) -> tuple[str, str]:
    """A pretend instance; with `port` its veth's host end is named like a TAP and allowed
    its MAC and IP in the bridge table, as `netops.instance_up` does for a TAP."""
    ns = spaces.new(f"g{net_id}-{index}")
    end = port or f"vh{net_id}x{index}"
    plug(h, ns, end, plan.bridge_name(net_id))
    ip = str(plan.ip_for(subnet, index))
    in_netns(ns, _configure_guest, f"{end}p", ip, str(plan.gateway(subnet)),
             plan.mac_for(net_id, index))
    if port:
        in_netns(h, FW.ensure_port, firewall.Port.of(port, plan.mac_for(net_id, index), ip,
                                                     net_id))
    return ns, ip


def _up(*tenants: firewall.TenantNet) -> None:
    host.enable_forwarding()
    for t in tenants:
        host.ensure_bridge(t.net_id, t.subnet)
        FW.ensure_tenant(t, host.host_networks())


def _drop_tables() -> None:
    FW.remove_all()


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hello"); c.close()
"""


def _serve(ns: str, port: int) -> subprocess.Popen[str]:
    """A TCP service bound to every address of `ns` (as a careless host service would be)."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, str(port)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def _connect(addr: str, port: int = 8000) -> str:
    """What a guest's TCP connect sees: ok, refused (a reset: at once), or another error."""
    try:
        with socket.create_connection((addr, port), timeout=8) as s:
            return "ok" if s.recv(5) == b"hello" else "no greeting"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))


def connect(ns: str, addr: str) -> str:
    return in_netns(ns, _connect, addr)


def _ping6_all_nodes(iface: str, wait: float) -> list[str]:
    """Who answers an ICMPv6 echo to ff02::1 on `iface` (the sender's own reply aside)."""
    idx = socket.if_nametoindex(iface)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        s.settimeout(0.2)
        seen: set[str] = set()
        echo = struct.pack("!BBHHH", 128, 0, 0, 0x6d76, 1)
        # The sender's own link-local address is usable only once its duplicate address
        # detection ends (a second or more on a loaded host): until then, sending fails.
        ready_by = time.monotonic() + 20
        while True:
            try:
                s.sendto(echo, ("ff02::1", 0, 0, idx))
                break
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL or time.monotonic() > ready_by:
                    raise
                time.sleep(0.05)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            s.sendto(echo, ("ff02::1", 0, 0, idx))
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                try:
                    data, addr = s.recvfrom(1500)
                except TimeoutError:
                    continue
                if data[0] == 129:
                    seen.add(addr[0].split("%")[0])
        return sorted(seen)


def _eui64(mac: str) -> str:
    b = bytes.fromhex(mac.replace(":", ""))
    e = bytes([b[0] ^ 2]) + b[1:3] + b"\xff\xfe" + b[3:]
    return "fe80::" + ":".join(f"{int.from_bytes(e[i:i + 2], 'big'):x}" for i in range(0, 8, 2))


# -- a closed host ------------------------------------------------------------------------

def test_guests_reach_no_host_service_no_link_local_and_the_outside_only(spaces: Namespaces) -> None:
    h, out = spaces.new("host"), spaces.new("out")
    _uplink(h, out)
    t0, t1 = firewall.TenantNet.of(0, S0), firewall.TenantNet.of(1, S1)
    in_netns(h, _up, t0, t1)
    a0, _ = _guest(spaces, h, 0, S0, 3)
    a1, _ = _guest(spaces, h, 1, S1, 3)
    services = [_serve(h, 8000), _serve(out, 8000)]
    try:
        gw0, gw1 = str(t0.gateway), str(t1.gateway)
        seen = {addr: connect(a0, addr)
                for addr in (gw0, gw1, "192.168.77.1", "192.168.77.2", METADATA, INTERNET)}
        assert seen == {gw0: "refused",          # a host service on its own gateway
                        gw1: "refused",          # … on another tenant's gateway
                        "192.168.77.1": "refused",  # … on the host's uplink address
                        "192.168.77.2": "refused",  # a host network (the uplink's LAN)
                        METADATA: "refused",     # link-local, through the uplink
                        INTERNET: "ok"}          # beyond the default route: NATed egress
        assert ping(a0, gw0, True), "ping to its own gateway answers"
        assert not ping(a0, gw1, False), "ping to another tenant's gateway does not"
        assert connect(a1, gw0) == "refused" and connect(a1, INTERNET) == "ok"
        # IPv6: the bridge has no address, so the host answers nothing on the tenant link
        bridge_ll = _eui64(plan.mac_for(0, plan.GATEWAY_INDEX))
        assert bridge_ll not in in_netns(a0, _ping6_all_nodes, "eth0", 1.5)

        # egress lists, applied to a live network
        in_netns(h, FW.ensure_tenant, firewall.TenantNet.of(0, S0, deny=["203.0.113.0/24"]),
                 [IPv4Network("192.168.77.0/24")])
        assert connect(a0, INTERNET) == "refused"
        in_netns(h, FW.ensure_tenant, firewall.TenantNet.of(0, S0, allow=["198.51.100.0/24"]),
                 [IPv4Network("192.168.77.0/24")])
        assert connect(a0, INTERNET) == "refused"
        in_netns(h, FW.ensure_tenant, firewall.TenantNet.of(0, S0, allow=[f"{INTERNET}/32"]),
                 [IPv4Network("192.168.77.0/24")])
        assert connect(a0, INTERNET) == "ok"
        assert connect(a0, METADATA) == "refused"  # an allow list never opens the host's

        # control: without mvm's tables (and NAT: `out` routes back; IPv6 on the bridge)
        # all of it answers
        in_netns(h, _drop_tables)
        in_netns(out, lambda: _ip("route", "add", "10.192.0.0/16", "via", "192.168.77.1"))
        assert connect(a0, gw0) == "ok" and connect(a0, gw1) == "ok"
        assert connect(a0, METADATA) == "ok"
        in_netns(h, lambda: Path("/proc/sys/net/ipv6/conf/mvmbr0/disable_ipv6").write_text("0"))
        assert bridge_ll in in_netns(a0, _ping6_all_nodes, "eth0", 6.0)
    finally:
        for p in services:
            p.kill()
            p.wait()


# -- anti-spoofing ------------------------------------------------------------------------

SNIFFER = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0)); s.settimeout(0.2); print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        f, addr = s.recvfrom(2048)
    except TimeoutError:
        continue
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    kind, src = f[12:14].hex(), f[6:12].hex(":")
    if kind == "0800":
        print("ip", src, socket.inet_ntoa(f[26:30]), flush=True)
    elif kind == "0806":
        print("arp", src, socket.inet_ntoa(f[28:32]), flush=True)
"""


def _sniff(ns: str, seconds: float) -> subprocess.Popen[str]:
    """Every IPv4 and ARP frame `ns` receives on eth0: (kind, source MAC, source IP)."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SNIFFER,
                          str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def _frames(p: subprocess.Popen[str]) -> set[tuple[str, ...]]:
    out, _ = p.communicate(timeout=60)
    return {tuple(line.split()) for line in out.splitlines()}


SPOOF_IP, SPOOF_MAC = "10.192.0.50", "02:00:00:00:00:99"


def _spoof(victim_ip: str, victim_mac: str, gateway: str) -> None:
    """From a guest: one honest datagram, then a forged source IP, a forged ARP claim to
    the gateway's address, and a forged source MAC."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.neigh("replace", dst=victim_ip, lladdr=victim_mac, ifindex=idx, state=0x80)
        own_mac = ipr.get_links(idx)[0].get("address")
        ipr.addr("add", index=idx, address=SPOOF_IP, prefixlen=32)
    for source in (None, SPOOF_IP):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            if source:
                s.bind((source, 0))
            s.sendto(b"x", (victim_ip, 9000))
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, bytes.fromhex(own_mac.replace(":", "")),
                      socket.inet_aton(gateway), b"\xff" * 6, socket.inet_aton(gateway))
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind(("eth0", 0))
        s.send(b"\xff" * 6 + bytes.fromhex(own_mac.replace(":", "")) + b"\x08\x06" + arp)
    with IPRoute() as ipr:
        ipr.link("set", index=idx, address=SPOOF_MAC)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", (victim_ip, 9000))
    time.sleep(0.3)


def test_a_port_sends_only_its_own_mac_and_ip(spaces: Namespaces) -> None:
    h = spaces.new("host")
    in_netns(h, _up, firewall.TenantNet.of(0, S0))
    spoofer, s_ip = _guest(spaces, h, 0, S0, 3, port="mvt0000a003")
    victim, v_ip = _guest(spaces, h, 0, S0, 4, port="mvt0000a004")
    s_mac, v_mac, gw = plan.mac_for(0, 3), plan.mac_for(0, 4), str(plan.gateway(S0))

    def attempt() -> set[tuple[str, ...]]:
        sniffer = _sniff(victim, 4.0)
        in_netns(spoofer, _spoof, v_ip, v_mac, gw)
        return _frames(sniffer)

    seen = attempt()
    assert ("ip", s_mac, s_ip) in seen  # the honest datagram arrives
    forged = {f for f in seen if SPOOF_IP in f or SPOOF_MAC in f or ("arp", s_mac, gw) == f}
    assert forged == set(), "spoofed frames reached the other guest"
    assert ping(victim, gw, True), "the victim still reaches its gateway"
    # a port mvm forgot (its instance stopped) sends nothing at all
    assert in_netns(h, FW.remove_port, "mvt0000a004") is True
    assert not ping(victim, gw, False)
    in_netns(h, FW.ensure_port, firewall.Port.of("mvt0000a004", v_mac, v_ip, 0))
    assert ping(victim, gw, True)

    # control: without the bridge table the same forgeries arrive
    in_netns(spoofer, lambda: _ip("addr", "del", f"{SPOOF_IP}/32", "dev", "eth0"))
    in_netns(spoofer, lambda: _ip("link", "set", "eth0", "address", s_mac))
    in_netns(h, lambda: proc.run(["nft", "delete", "table", "bridge", FW.name]))
    seen = attempt()
    assert ("ip", s_mac, SPOOF_IP) in seen and ("arp", s_mac, gw) in seen
    assert any(SPOOF_MAC in f for f in seen)


# -- one state home per network namespace ---------------------------------------------------

def _claim_as(home: str, directory: str) -> str:
    try:
        old = claim.claim(home, f"mvm-{Path(home).name}", host.live_taps, netops.take_over,
                          Path(directory))
        return f"claimed (took over from {old.home})" if old else "claimed"
    except Conflict as e:
        return e.line()


def _hold_tap(name: str, ready_w: int, done_r: int) -> None:
    """Attach to TAP `name` (as a hypervisor does) until told to stop."""
    import fcntl

    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0002 | 0x1000))
    os.write(ready_w, b"1")
    os.read(done_r, 1)
    os.close(fd)


def test_a_second_home_is_refused_while_the_first_lives_and_takes_over_after(
        spaces: Namespaces, tmp_path: Path) -> None:
    h = spaces.new("host")
    d = str(tmp_path / "markers")

    def body() -> dict[str, object]:
        seen: dict[str, object] = {}
        host.ensure_bridge(0, S0)
        host.ensure_tap("mvt0000b001", "mvmbr0")
        firewall.Firewall("mvm-a").ensure_tenant(firewall.TenantNet.of(0, S0))
        # home a, in a process that is at work (holds the shared lock)
        r, w = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _claim_as("/homes/a", d)
            os.write(w, b"1")
            os.read(r2, 1)
            os._exit(0)
        os.read(r, 1)
        seen["while a's command works"] = _claim_as("/homes/b", d)
        os.write(w2, b"1")
        os.waitpid(pid, 0)
        # a's command ended, but a hypervisor of a holds its TAP
        r, w = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            _hold_tap("mvt0000b001", w, r2)
            os._exit(0)
        os.read(r, 1)
        seen["while a's guest runs"] = _claim_as("/homes/b", d)
        os.write(w2, b"1")
        os.waitpid(pid, 0)
        seen["a's processes gone"] = _claim_as("/homes/b", d)
        seen["tables"] = firewall.list_tables()
        seen["links"] = sorted(host.links())
        m = claim.read(Path(d))
        seen["marker"] = m.home if m else None
        return seen

    seen = in_netns(h, body)
    assert seen["while a's command works"] == (
        "this network namespace is managed by another mvm state home, /homes/a (an mvm command "
        "of it is at work) (use that home (MVM_HOME), or run this one in a network namespace "
        "of its own)")
    assert "/homes/a (its hypervisors hold 1 TAP(s))" in str(seen["while a's guest runs"])
    assert seen["a's processes gone"] == "claimed (took over from /homes/a)"
    # what a left (its tables, bridge and TAP) went with its claim: no name can collide
    assert ("inet", "mvm-a") not in seen["tables"] and seen["links"] == []
    assert seen["marker"] == "/homes/b"


# -- inputs: subnets on host routes, egress lists ------------------------------------------

def test_subnet_on_a_host_route_is_refused_and_allocation_avoids_routes(
        spaces: Namespaces, tmp_path: Path) -> None:
    from tests.conftest import Mvm

    h = spaces.new("host")
    for argv in (["link", "add", "lan0", "type", "veth", "peer", "name", "lan0p"],
                 ["link", "set", "lan0", "up"], ["link", "set", "lan0p", "up"],
                 ["addr", "add", "10.50.0.1/16", "dev", "lan0"],
                 ["route", "add", "10.192.0.0/24", "dev", "lan0"],
                 ["route", "add", "default", "dev", "lan0"]):
        proc.run(["ip", "-n", h, *argv])
    m = Mvm(tmp_path / "home", ns=h)
    r = m("tenant", "create", "a", "--subnet", "10.50.3.0/24")
    assert r.rc == 4 and r.lines == ["error: subnet 10.50.3.0/24 overlaps the host route "
                                     "10.50.0.0/16 (pick another /24, or omit --subnet to have "
                                     "one allocated)"]
    assert json.loads(m.ok("tenant", "list", "--json").out) == []
    # the default route is not a host network; 10.192.0.0/24 is taken by a route
    assert "subnet 10.192.1.0/24" in m.ok("tenant", "create", "b").out
    m.ok("tenant", "create", "c", "--subnet", "10.51.0.0/24")
    proc.run(["ip", "-n", h, "route", "add", "10.192.0.0/12", "dev", "lan0"])
    r = m("tenant", "create", "d")
    assert r.rc == 5 and len(r.lines) == 1 and "host routes 10.50.0.0/16, 10.192.0.0/12" in r.err


def test_egress_lists_are_set_shown_and_validated(tmp_path: Path) -> None:
    from tests.conftest import Mvm

    m = Mvm(tmp_path / "home")
    m.ok("tenant", "create", "e", "--egress-allow", "203.0.113.0/24", "--egress-allow",
         "198.51.100.7", "--egress-deny", "203.0.113.128/25")
    info = json.loads(m.ok("tenant", "info", "e", "--json").out)
    assert info["egress"] == {"allow": ["203.0.113.0/24", "198.51.100.7/32"],
                              "deny": ["203.0.113.128/25"]}
    m.ok("tenant", "egress", "e", "--deny", "192.0.2.0/24")  # replaces deny, keeps allow
    assert json.loads(m.ok("tenant", "egress", "e", "--json").out) == {
        "allow": ["203.0.113.0/24", "198.51.100.7/32"], "deny": ["192.0.2.0/24"]}
    m.ok("tenant", "egress", "e", "--clear")
    assert json.loads(m.ok("tenant", "egress", "e", "--json").out) == {"allow": [], "deny": []}
    for bad, says in ((["--egress-allow", "10.0.0.1/8"], "has host bits set"),
                      (["--egress-deny", "fd00::/8"], "IPv4 only"),
                      (["--egress-allow", "nonsense"], "is not an IPv4 CIDR")):
        r = m("tenant", "create", "f", *bad)
        assert r.rc == 2 and len(r.lines) == 1 and says in r.err, r.err
    r = m("tenant", "egress", "e", "--allow", "300.1.1.1")
    assert r.rc == 2 and len(r.lines) == 1
    assert [t["id"] for t in json.loads(m.ok("tenant", "list", "--json").out)] == ["e"]
    assert json.loads(m.ok("tenant", "egress", "e", "--json").out) == {"allow": [], "deny": []}


def test_rules_for_egress_lists() -> None:
    t = firewall.TenantNet.of(5, "10.192.5.0/24", allow=["203.0.113.0/24"], deny=["203.0.113.9"])
    comments = [r.comment for r in firewall.tenant_rules(t)]
    assert comments == ["mvm:t:5 same tenant", "mvm:t:5 spoofed source", "mvm:t:5 closed host",
                        "mvm:t:5 egress deny 203.0.113.9/32",
                        "mvm:t:5 egress allow 203.0.113.0/24", "mvm:t:5 egress not allowed"]
    open_ = [r.comment for r in firewall.tenant_rules(firewall.TenantNet.of(5, "10.192.5.0/24"))]
    assert open_[-1] == "mvm:t:5 egress"
    assert [r.comment for r in firewall.host_rules(t)] == [
        "mvm:t:5 replies to the host", "mvm:t:5 ping own gateway", "mvm:t:5 no host service"]
