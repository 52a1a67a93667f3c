"""Bridges and TAPs on the host, over netlink (pyroute2) — never by running `ip`.

Every function acts on the network namespace of the calling process and only on links
whose names have mvm's exact shapes (`plan.BRIDGE_RE`, `plan.TAP_RE`). A link with one
of mvm's names but the wrong kind is someone else's: it is reported, never changed.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from mvm.errors import Conflict, HostUnsupported, MvmError, NotFound
from mvm.network import plan

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IPV6_CONF = Path("/proc/sys/net/ipv6/conf")


class NetworkError(MvmError):
    """The kernel refused a network change."""


@dataclass(frozen=True)
class Link:
    """What verify needs to know about one of mvm's links."""

    name: str
    index: int
    kind: str | None  # "bridge", "tun", ...
    up: bool
    master: str | None
    mac: str
    addresses: tuple[IPv4Interface, ...]
    tap: bool  # a tun device in TAP mode


@contextmanager
def _ipr() -> Iterator[Any]:
    try:
        ipr = IPRoute()
    except OSError as e:
        raise HostUnsupported(f"cannot open a netlink socket: {e.strerror}") from e
    try:
        yield ipr
    finally:
        ipr.close()


def _fail(action: str, e: NetlinkError) -> MvmError:
    code = e.code
    if code == errno.EPERM:
        return HostUnsupported(f"{action}: operation not permitted",
                               "mvm manages host networking and must run as root")
    message = e.args[1] if len(e.args) > 1 else str(e)
    return NetworkError(f"{action}: {message}")


def _lookup(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _kind(msg: Any) -> str | None:
    kind = msg.get(("linkinfo", "kind"))
    return str(kind) if kind is not None else None


def _is_tap(msg: Any) -> bool:
    if _kind(msg) != "tun":
        return False
    data = msg.get(("linkinfo", "data"))
    # IFLA_TUN_TYPE: 1 = tun, 2 = tap
    return data is not None and data.get("IFLA_TUN_TYPE") == 2


def _link(ipr: Any, msg: Any, names: dict[int, str]) -> Link:
    index = msg["index"]
    master = msg.get("master")
    addrs = tuple(
        IPv4Interface(f"{a.get('address')}/{a['prefixlen']}")
        for a in ipr.get_addr(index=index, family=2)
    )
    return Link(
        name=msg.get("ifname"),
        index=index,
        kind=_kind(msg),
        up=bool(msg["flags"] & 1),  # IFF_UP: administratively up
        master=names.get(master) if master else None,
        mac=str(msg.get("address") or ""),
        addresses=addrs,
        tap=_is_tap(msg),
    )


def links() -> dict[str, Link]:
    """Every link whose name has one of mvm's shapes, by name (whatever its kind)."""
    with _ipr() as ipr:
        dump = list(ipr.get_links())
        names = {m["index"]: m.get("ifname") for m in dump}
        return {
            m.get("ifname"): _link(ipr, m, names)
            for m in dump
            if plan.is_bridge_name(m.get("ifname")) or plan.is_tap_name(m.get("ifname"))
        }


def list_bridges() -> list[str]:
    """Names of mvm's bridges (`mvmbr<net-id>` of kind bridge)."""
    return sorted(n for n, link in links().items() if plan.is_bridge_name(n)
                  and link.kind == "bridge")


def list_taps() -> list[str]:
    """Names of mvm's TAPs (`mvt<8 hex>` tun devices in TAP mode)."""
    return sorted(n for n, link in links().items() if plan.is_tap_name(n) and link.tap)


def ensure_bridge(net_id: int, subnet: str | IPv4Network) -> str:
    """Make the tenant's bridge exist with exactly the gateway address, a fixed MAC, up.

    Idempotent; a bridge with a stale address (the tenant's subnet changed) is corrected.
    """
    name = plan.bridge_name(net_id)
    gw = IPv4Interface(f"{plan.gateway(subnet)}/24")
    mac = plan.mac_for(net_id, plan.GATEWAY_INDEX)
    with _ipr() as ipr:
        index = _lookup(ipr, name)
        if index is None:
            try:
                ipr.link("add", ifname=name, kind="bridge", address=mac)
            except NetlinkError as e:
                if e.code != errno.EEXIST:  # lost a race with another mvm: fine
                    raise _fail(f"creating bridge {name}", e) from e
            index = _lookup(ipr, name)
            if index is None:
                raise NetworkError(f"bridge {name} vanished right after it was created")
        msg = ipr.get_links(index)[0]
        if _kind(msg) != "bridge":
            raise Conflict(f"{name} exists but is a {_kind(msg) or 'plain'} link, not a bridge",
                           "mvm owns interfaces named mvmbr<N>; rename or remove that one")
        try:
            if msg.get("address") != mac:
                ipr.link("set", index=index, address=mac)
            present = {IPv4Interface(f"{a.get('address')}/{a['prefixlen']}")
                       for a in ipr.get_addr(index=index, family=2)}
            for stale in present - {gw}:
                ipr.addr("del", index=index, address=str(stale.ip),
                         prefixlen=stale.network.prefixlen)
            if gw not in present:
                ipr.addr("add", index=index, address=str(gw.ip), prefixlen=24)
            _no_ipv6(name)  # before it is up: no link-local address, nothing to answer
            if not msg["flags"] & 1:
                ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise _fail(f"configuring bridge {name}", e) from e
    return name


def remove_bridge(net_id: int) -> bool:
    """Delete the tenant's bridge; True if there was one. Its ports are only detached."""
    name = plan.bridge_name(net_id)
    return _remove(name, lambda m: _kind(m) == "bridge", "bridge")


def ensure_tap(name: str, bridge: str, owner: int = 0) -> None:
    """A persistent TAP `name`, owned by uid `owner`, enslaved to `bridge`, up.

    QEMU attaches with `-netdev tap,ifname=<name>,script=no,downscript=no`, Firecracker
    with `host_dev_name`. The device has IFF_NO_PI and IFF_VNET_HDR, as both expect.
    """
    if not plan.is_tap_name(name):
        raise ValueError(f"not an mvm TAP name: {name!r}")
    if not plan.is_bridge_name(bridge):
        raise ValueError(f"not an mvm bridge name: {bridge!r}")
    with _ipr() as ipr:
        br = _lookup(ipr, bridge)
        if br is None:
            raise NotFound(f"bridge {bridge} does not exist",
                           "the tenant network is not set up; `mvm doctor --repair` restores it")
        index = _lookup(ipr, name)
        if index is None:
            try:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap", uid=owner,
                         ifr={"no_pi": True, "one_queue": False, "vnet_hdr": True,
                              "multi_queue": False})
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise _fail(f"creating TAP {name}", e) from e
            index = _lookup(ipr, name)
            if index is None:
                raise NetworkError(f"TAP {name} vanished right after it was created")
        msg = ipr.get_links(index)[0]
        if not _is_tap(msg):
            raise Conflict(f"{name} exists but is not a TAP device",
                           "mvm owns interfaces named mvt<8 hex>; rename or remove that one")
        _no_ipv6(name)
        try:
            if msg.get("master") != br or not msg["flags"] & 1:
                ipr.link("set", index=index, master=br, state="up")
        except NetlinkError as e:
            raise _fail(f"attaching TAP {name} to {bridge}", e) from e


def _no_ipv6(name: str) -> None:
    """No IPv6 on a tenant bridge or TAP: tenant networks are IPv4 only, and a host link-local
    address there would answer guests (the firewall refuses IPv6 from guests as well)."""
    conf = IPV6_CONF / name / "disable_ipv6"
    try:
        if conf.read_text().strip() != "1":
            conf.write_text("1\n")
    except FileNotFoundError:
        pass  # a kernel without IPv6: nothing to disable
    except PermissionError as e:
        raise HostUnsupported(f"cannot disable IPv6 on {name}: permission denied",
                              "mvm manages host networking and must run as root") from e


def ipv6_disabled(name: str) -> bool:
    conf = IPV6_CONF / name / "disable_ipv6"
    try:
        return conf.read_text().strip() == "1"
    except FileNotFoundError:
        return not IPV6_CONF.exists()


def live_taps() -> list[str]:
    """mvm's TAPs a process holds open (their carrier is up only then): running hypervisors."""
    with _ipr() as ipr:
        return sorted(m.get("ifname") for m in ipr.get_links()
                      if plan.is_tap_name(m.get("ifname") or "") and _is_tap(m)
                      and m.get("carrier") == 1)


def host_networks() -> list[IPv4Network]:
    """The host's own IPv4 networks: destinations of its routes (main table) other than the
    default route and the routes of mvm's tenant bridges. Guests may not reach them."""
    out = set()
    with _ipr() as ipr:
        names = {m["index"]: m.get("ifname") for m in ipr.get_links()}
        for r in ipr.get_routes(family=2, table=254):
            dst = r.get("dst")
            if dst is None or r["dst_len"] == 0 or plan.is_bridge_name(names.get(r.get("oif"), "")):
                continue
            out.add(IPv4Network(f"{dst}/{r['dst_len']}", strict=False))
    return sorted(out)


def remove_tap(name: str) -> bool:
    """Delete a TAP; True if there was one."""
    if not plan.is_tap_name(name):
        raise ValueError(f"not an mvm TAP name: {name!r}")
    return _remove(name, _is_tap, "TAP")


def _remove(name: str, ours: Any, what: str) -> bool:
    with _ipr() as ipr:
        index = _lookup(ipr, name)
        if index is None:
            return False
        if not ours(ipr.get_links(index)[0]):
            raise Conflict(f"{name} is not a {what}; leaving it alone")
        try:
            ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code == errno.ENODEV:  # someone else removed it first
                return False
            raise _fail(f"removing {what} {name}", e) from e
    return True


def forwarding_enabled() -> bool:
    return IP_FORWARD.read_text().strip() == "1"


def enable_forwarding() -> bool:
    """Turn on IPv4 forwarding (needed for NAT egress); True if it was off."""
    if forwarding_enabled():
        return False
    try:
        IP_FORWARD.write_text("1\n")
    except PermissionError as e:
        raise HostUnsupported("cannot enable IPv4 forwarding: permission denied",
                              "mvm manages host networking and must run as root") from e
    return True


def routes_overlapping(subnet: str | IPv4Network) -> list[str]:
    """Host routes (other than mvm's own bridges') that overlap `subnet`, as CIDR text.

    A tenant subnet that overlaps a route the host already uses would shadow it; tenant
    creation can refuse such a subnet with this.
    """
    net = IPv4Network(str(subnet))
    return [str(r) for r in host_networks() if r.overlaps(net)]
