"""Tenant network plan: names, addresses and allocations. Pure — no host access.

A tenant owns a net-id (0–4095) and one /24. In that /24, `.1` is the gateway (the
address of the tenant's bridge on the host), `.2` is reserved for the builder microVM
and instances take `.3`–`.254`. Everything here is derived deterministically from the
net-id and an instance's host index, so the same inputs always give the same bridge,
TAP, MAC and IP, and a crashed host can rebuild its network from the database alone.

Default subnets come from 10.192.0.0/12, which holds exactly 4096 /24s: net-id N gets
`10.(192 + N // 256).(N % 256).0/24` (net-id 0 → 10.192.0.0/24, net-id 4095 →
10.207.255.0/24). A tenant may bring its own /24 of RFC 1918 space instead; when a
custom subnet already sits on a net-id's default /24, allocation takes the lowest free
/24 of the pool.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from mvm.errors import Conflict, InvalidInput, QuotaExceeded

NET_ID_MIN = 0
NET_ID_MAX = 4095
GATEWAY_INDEX = 1
BUILDER_INDEX = 2
FIRST_INSTANCE_INDEX = 3
LAST_INSTANCE_INDEX = 254

BRIDGE_PREFIX = "mvmbr"
TAP_PREFIX = "mvt"
# What counts as "ours" on a host: exact shapes, so a foreign `mvmbr-x` or `mvtap0` is
# never listed, verified or removed by mvm.
BRIDGE_RE = re.compile(r"mvmbr(0|[1-9][0-9]{0,3})")
TAP_RE = re.compile(r"mvt[0-9a-f]{8}")
# The builder microVM's TAP on its tenant's network: `mvb<net-id, 3 hex>` (one per tenant, at
# the tenant's reserved builder address `.2`).
BUILDER_TAP_PREFIX = "mvb"
BUILDER_TAP_RE = re.compile(r"mvb[0-9a-f]{3}")
INSTANCE_ID_RE = re.compile(r"i-[0-9a-f]{8}")

SUBNET_POOL = IPv4Network("10.192.0.0/12")
PRIVATE_RANGES = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
)
NETMASK_24 = "255.255.255.0"

Subnet = str | IPv4Network
SubnetsInUse = Iterable[Subnet] | Mapping[str, Subnet]


def _net(subnet: Subnet) -> IPv4Network:
    return subnet if isinstance(subnet, IPv4Network) else IPv4Network(subnet)


# -- names -------------------------------------------------------------------------


def bridge_name(net_id: int) -> str:
    """`mvmbr<net_id>`: at most 9 characters, well under IFNAMSIZ (15)."""
    _check_net_id_range(net_id)
    return f"{BRIDGE_PREFIX}{net_id}"


def net_id_of_bridge(name: str) -> int | None:
    """The net-id a bridge name encodes, or None if the name is not one of mvm's."""
    if not BRIDGE_RE.fullmatch(name):
        return None
    n = int(name[len(BRIDGE_PREFIX):])
    return n if n <= NET_ID_MAX else None


def tap_name(instance_id: str) -> str:
    """`mvt<8 hex>` for instance `i-<8 hex>` (11 characters)."""
    if not INSTANCE_ID_RE.fullmatch(instance_id):
        raise InvalidInput(f"invalid instance id {instance_id!r}",
                           "instance ids are 'i-' followed by 8 lowercase hex digits")
    return TAP_PREFIX + instance_id[2:]


def is_bridge_name(name: str) -> bool:
    return net_id_of_bridge(name) is not None


def builder_tap_name(net_id: int) -> str:
    """`mvb<3 hex>`: the TAP of the tenant's builder microVM (never an instance's shape)."""
    _check_net_id_range(net_id)
    return f"{BUILDER_TAP_PREFIX}{net_id:03x}"


def is_builder_tap_name(name: str) -> bool:
    return BUILDER_TAP_RE.fullmatch(name) is not None


def is_tap_name(name: str) -> bool:
    """An instance's TAP or a builder's: both are mvm's."""
    return TAP_RE.fullmatch(name) is not None or BUILDER_TAP_RE.fullmatch(name) is not None


# -- addresses ---------------------------------------------------------------------


def mac_for(net_id: int, host_index: int) -> str:
    """A locally administered unicast MAC, unique per (net-id, host index).

    `02:6d:76` ("mv" with the locally-administered bit set), then the 12-bit net-id in
    two octets, then the host index. The bridge itself uses host index 1, so its MAC
    never changes when ports come and go (guests' ARP entries stay valid).
    """
    _check_net_id_range(net_id)
    _check_host_index(host_index)
    return f"02:6d:76:{net_id >> 8:02x}:{net_id & 0xFF:02x}:{host_index:02x}"


def ip_for(subnet: Subnet, host_index: int) -> IPv4Address:
    _check_host_index(host_index)
    net = _net(subnet)
    if net.prefixlen != 24:
        raise InvalidInput(f"tenant subnet {net} is not a /24")
    return net.network_address + host_index


def gateway(subnet: Subnet) -> IPv4Address:
    return ip_for(subnet, GATEWAY_INDEX)


def builder_ip(subnet: Subnet) -> IPv4Address:
    return ip_for(subnet, BUILDER_INDEX)


def kernel_ip_arg(ip: str | IPv4Address, gw: str | IPv4Address, netmask: str,
                  hostname: str) -> str:
    """The kernel's `ip=` parameter, which mvm's guest init parses.

    Format: `ip=<client>::<gateway>:<netmask>:<hostname>:eth0:off` (the empty field is
    the NFS server, unused).
    """
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", hostname):
        raise InvalidInput(f"invalid guest hostname {hostname!r}",
                           "letters, digits and '-', 1–63 characters")
    ipaddress.IPv4Address(str(netmask))  # a malformed mask is a programming error
    return f"ip={IPv4Address(str(ip))}::{IPv4Address(str(gw))}:{netmask}:{hostname}:eth0:off"


@dataclass(frozen=True)
class InstanceNet:
    """Everything the runtime needs to plug one instance into its tenant's network."""

    net_id: int
    subnet: IPv4Network
    host_index: int
    bridge: str
    tap: str
    mac: str
    ip: IPv4Address
    gateway: IPv4Address

    @property
    def netmask(self) -> str:
        return str(self.subnet.netmask)

    def kernel_arg(self, hostname: str) -> str:
        return kernel_ip_arg(self.ip, self.gateway, self.netmask, hostname)


def instance_net(net_id: int, subnet: Subnet, instance_id: str, host_index: int) -> InstanceNet:
    net = _net(subnet)
    return InstanceNet(
        net_id=net_id,
        subnet=net,
        host_index=host_index,
        bridge=bridge_name(net_id),
        tap=tap_name(instance_id),
        mac=mac_for(net_id, host_index),
        ip=ip_for(net, host_index),
        gateway=gateway(net),
    )


# -- allocation and validation -----------------------------------------------------


def allocate_host_index(used: set[int]) -> int:
    """Lowest free instance index in 3..254."""
    for index in range(FIRST_INSTANCE_INDEX, LAST_INSTANCE_INDEX + 1):
        if index not in used:
            return index
    count = LAST_INSTANCE_INDEX - FIRST_INSTANCE_INDEX + 1
    raise QuotaExceeded(
        f"tenant network is full: all {count} instance addresses (.3–.254) of its /24 are in use",
        "destroy instances the tenant no longer needs",
    )


def validate_net_id(n: object, used: Iterable[int] = ()) -> int:
    """Return n if it is a free net-id in 0..4095; else raise one clear line."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidInput(f"net-id must be an integer, got {n!r}")
    _check_net_id_range(n)
    if n in set(used):
        raise Conflict(f"net-id {n} is already used by another tenant",
                       "omit --net-id to have one allocated")
    return n


def allocate_net_id(used: Iterable[int]) -> int:
    taken = set(used)
    for n in range(NET_ID_MIN, NET_ID_MAX + 1):
        if n not in taken:
            return n
    raise QuotaExceeded(f"all {NET_ID_MAX + 1} net-ids are in use",
                        "destroy tenants that are no longer needed")


def default_subnet(net_id: int) -> IPv4Network:
    """The /24 of the pool that belongs to net-id `net_id`."""
    _check_net_id_range(net_id)
    return IPv4Network((int(SUBNET_POOL.network_address) + (net_id << 8), 24))


def allocate_subnet(used_subnets: SubnetsInUse, net_id: int) -> IPv4Network:
    """The net-id's default /24, or the lowest free /24 of the pool if that overlaps."""
    used = [net for _, net in _subnets(used_subnets)]
    preferred = default_subnet(net_id)
    if not any(preferred.overlaps(u) for u in used):
        return preferred
    for candidate in SUBNET_POOL.subnets(new_prefix=24):
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise QuotaExceeded(f"no free /24 left in {SUBNET_POOL}",
                        "give the tenant a subnet of its own with --subnet")


def validate_subnet(cidr: object, others: SubnetsInUse = ()) -> IPv4Network:
    """Return cidr as a network if it is a free /24 of private space; else one clear line.

    `others` is the other tenants' subnets — a mapping of tenant → subnet makes the
    message name the tenant it collides with.
    """
    text = str(cidr).strip()
    try:
        net = IPv4Network(text)
    except ValueError:
        try:
            loose = IPv4Network(text, strict=False)
        except ValueError:
            raise InvalidInput(f"invalid subnet {text!r}",
                               "write an IPv4 /24, e.g. 10.210.7.0/24") from None
        raise InvalidInput(f"subnet {text} has host bits set", f"did you mean {loose}?") \
            from None
    if net.prefixlen != 24:
        raise InvalidInput(f"subnet {text} is not a /24", "a tenant network is exactly one /24")
    if not any(net.subnet_of(r) for r in PRIVATE_RANGES):
        raise InvalidInput(f"subnet {net} is not private address space",
                           "use a /24 in 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16")
    for owner, other in _subnets(others):
        if net.overlaps(other):
            who = f"tenant {owner}" if owner else "another tenant"
            raise Conflict(f"subnet {net} overlaps {other} of {who}",
                           "pick another /24, or omit --subnet to have one allocated")
    return net


def _subnets(value: SubnetsInUse) -> list[tuple[str | None, IPv4Network]]:
    """The two accepted shapes of 'subnets in use' as (owner or None, network) pairs."""
    if isinstance(value, Mapping):
        return [(str(owner), _net(s)) for owner, s in value.items()]
    return [(None, _net(s)) for s in value]


def _check_net_id_range(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not NET_ID_MIN <= n <= NET_ID_MAX:
        raise InvalidInput(f"net-id {n!r} is out of range",
                           f"net-ids are {NET_ID_MIN}–{NET_ID_MAX}")


def _check_host_index(i: int) -> None:
    if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= 254:
        raise InvalidInput(f"host index {i!r} is out of range", "a /24 has hosts .1–.254")
