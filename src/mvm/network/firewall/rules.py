"""The firewall's rules, pure: what nftables must hold for the tenants (see the package's
docstring for the layout), as nft's JSON echoes it, so that drift is compared exactly."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from mvm.errors import InvalidInput
from mvm.network import plan

FAMILY = "inet"
BRIDGE_FAMILY = "bridge"
TABLE = "mvm"
SUBNETS = "subnets"
HOSTNETS = "hostnets"
FROM_BRIDGE = "from_bridge"
TO_HOST = "to_host"
INPUT = "input"
FORWARD = "forward"
TO_BRIDGE = "to_bridge"
REFUSE = "refuse"
CLOSED = "closed"
POSTROUTING = "postrouting"
BASE_CHAINS = (INPUT, FORWARD, TO_BRIDGE, REFUSE, CLOSED, POSTROUTING)
HOOKED = (INPUT, FORWARD, POSTROUTING)
PORTS = "ports"
PREROUTING = "prerouting"
FROM_PORT = "from_port"
BRIDGE_CHAINS = (PREROUTING, FROM_PORT)
TENANT_CHAIN_RE = re.compile(r"[th](0|[1-9][0-9]{0,3})")
BRIDGE_WILDCARD = plan.BRIDGE_PREFIX + "*"
TAP_WILDCARD = plan.TAP_PREFIX + "*"
LINK_LOCAL = IPv4Network("169.254.0.0/16")
MAX_EGRESS_RULES = 64
Json = dict[str, Any]


@dataclass(frozen=True)
class Rule:
    comment: str
    expr: tuple[Any, ...]  # nft JSON statements; compared exactly with what nft lists


@dataclass(frozen=True)
class TenantNet:
    net_id: int
    subnet: IPv4Network
    bridge: str
    egress_allow: tuple[IPv4Network, ...] = ()
    egress_deny: tuple[IPv4Network, ...] = ()

    @classmethod
    def of(cls, net_id: int, subnet: str | IPv4Network, bridge: str | None = None,
           allow: Iterable[str | IPv4Network] = (), deny: Iterable[str | IPv4Network] = (),
           ) -> TenantNet:
        return cls(net_id, IPv4Network(str(subnet)), bridge or plan.bridge_name(net_id),
                   tuple(IPv4Network(str(a)) for a in allow),
                   tuple(IPv4Network(str(d)) for d in deny))

    @property
    def tag(self) -> str:
        return tag(self.net_id)

    @property
    def chain(self) -> str:
        return tenant_chain(self.net_id)

    @property
    def host_chain(self) -> str:
        return f"h{self.net_id}"

    @property
    def gateway(self) -> IPv4Address:
        return plan.gateway(self.subnet)


@dataclass(frozen=True)
class Port:
    """What one bridge port (an instance's TAP) may send: its MAC and its IP."""

    name: str
    mac: str
    ip: IPv4Address
    net_id: int

    @classmethod
    def of(cls, name: str, mac: str, ip: str | IPv4Address, net_id: int) -> Port:
        return cls(name, mac.lower(), IPv4Address(str(ip)), net_id)


def tag(net_id: int) -> str:
    return f"mvm:t:{net_id}"


def tenant_chain(net_id: int) -> str:
    return f"t{net_id}"


def parse_egress(values: Iterable[str], what: str) -> tuple[IPv4Network, ...]:
    """CIDRs of an egress list (an address alone is a /32); one clear line when not."""
    out: list[IPv4Network] = []
    for raw in values:
        text = str(raw).strip()
        try:
            net = IPv4Network(text)
        except ValueError:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise InvalidInput(f"egress {what} list: {text!r} is not an IPv4 CIDR",
                                   "write e.g. 203.0.113.0/24 or 198.51.100.7") from None
            if loose.version == 6:
                raise InvalidInput(f"egress {what} list: {text}: tenant networks are IPv4 only",
                                   "give an IPv4 CIDR") from None
            raise InvalidInput(f"egress {what} list: {text} has host bits set",
                               f"did you mean {loose}?") from None
        if net not in out:
            out.append(net)
    if len(out) > MAX_EGRESS_RULES:
        raise InvalidInput(f"egress {what} list: {len(out)} CIDRs, at most {MAX_EGRESS_RULES}",
                           "merge them into wider CIDRs")
    return tuple(out)


# -- expressions ---------------------------------------------------------------------

def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, fld: str) -> Json:
    return {"payload": {"protocol": protocol, "field": fld}}


_SADDR = _payload("ip", "saddr")
_DADDR = _payload("ip", "daddr")
_ACCEPT: Json = {"accept": None}
_DROP: Json = {"drop": None}
_RETURN: Json = {"return": None}
_REFUSE: Json = {"goto": {"target": REFUSE}}
_CT_REPLIES = _match({"ct": {"key": "state"}}, ["established", "related"], "in")


def prefix(net: IPv4Network) -> Json | str:
    """A network as nft echoes it: a /32 is a bare address."""
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def base_rules() -> dict[str, list[Rule]]:
    return {
        INPUT: [
            Rule("mvm:base dispatch guest-to-host by bridge",
                 ({"vmap": {"key": _meta("iifname"), "data": "@" + TO_HOST}},)),
        ],
        FORWARD: [
            Rule("mvm:base dispatch by source bridge",
                 ({"vmap": {"key": _meta("iifname"), "data": "@" + FROM_BRIDGE}},)),
            Rule("mvm:base into a tenant bridge",
                 (_match(_meta("oifname"), BRIDGE_WILDCARD), {"jump": {"target": TO_BRIDGE}})),
        ],
        TO_BRIDGE: [
            Rule("mvm:base replies", (_CT_REPLIES, _ACCEPT)),
            Rule("mvm:base port forwards", (_match({"ct": {"key": "status"}}, "dnat", "in"),
                                            _ACCEPT)),
            Rule("mvm:base no new connections into a tenant", (_DROP,)),
        ],
        REFUSE: [
            Rule("mvm:base refuse tcp with a reset",
                 (_match(_meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}})),
            Rule("mvm:base refuse the rest as prohibited",
                 ({"reject": {"type": "icmpx", "expr": "admin-prohibited"}},)),
        ],
        CLOSED: [
            Rule("mvm:base ipv4 only", (_match(_meta("nfproto"), "ipv4", "!="), _REFUSE)),
            Rule("mvm:base other tenant", (_match(_meta("oifname"), BRIDGE_WILDCARD), _REFUSE)),
            Rule("mvm:base link-local", (_match(_DADDR, prefix(LINK_LOCAL)), _REFUSE)),
            Rule("mvm:base host networks", (_match(_DADDR, "@" + HOSTNETS), _REFUSE)),
        ],
        POSTROUTING: [
            Rule("mvm:base masquerade tenant egress",
                 (_match(_SADDR, "@" + SUBNETS), _match(_meta("oifname"), BRIDGE_WILDCARD, "!="),
                  {"masquerade": None})),
        ],
    }


def tenant_rules(t: TenantNet) -> list[Rule]:
    rules = [
        Rule(f"{t.tag} same tenant", (_match(_meta("oifname"), t.bridge), _ACCEPT)),
        Rule(f"{t.tag} spoofed source", (_match(_SADDR, prefix(t.subnet), "!="), _DROP)),
        Rule(f"{t.tag} closed host", ({"jump": {"target": CLOSED}},)),
    ]
    rules += [Rule(f"{t.tag} egress deny {n}", (_match(_DADDR, prefix(n)), _REFUSE))
              for n in t.egress_deny]
    if t.egress_allow:
        rules += [Rule(f"{t.tag} egress allow {n}", (_match(_DADDR, prefix(n)), _ACCEPT))
                  for n in t.egress_allow]
        rules.append(Rule(f"{t.tag} egress not allowed", (_REFUSE,)))
    else:
        rules.append(Rule(f"{t.tag} egress", (_ACCEPT,)))
    return rules


def host_rules(t: TenantNet) -> list[Rule]:
    return [
        Rule(f"{t.tag} replies to the host", (_CT_REPLIES, _ACCEPT)),
        Rule(f"{t.tag} ping own gateway",
             (_match(_DADDR, str(t.gateway)), _match(_payload("icmp", "type"), "echo-request"),
              _ACCEPT)),
        Rule(f"{t.tag} no host service", (_REFUSE,)),
    ]


def _port_key(*fields: Json) -> Json:
    return {"concat": [_meta("iifname"), *fields]}


def bridge_rules() -> dict[str, list[Rule]]:
    ether = _payload("ether", "saddr")
    return {
        PREROUTING: [
            Rule("mvm:base frames from a TAP",
                 (_match(_meta("iifname"), TAP_WILDCARD), {"jump": {"target": FROM_PORT}})),
        ],
        FROM_PORT: [
            Rule("mvm:base ipv4 from its own MAC and IP",
                 (_match(_port_key(ether, _SADDR), "@" + PORTS), _RETURN)),
            Rule("mvm:base arp for its own MAC and IP",
                 (_match(_port_key(ether, _payload("arp", "saddr ip")), "@" + PORTS),
                  _match(_port_key(_payload("arp", "saddr ether"), _payload("arp", "saddr ip")),
                         "@" + PORTS), _RETURN)),
            Rule("mvm:base anything else is spoofed", (_DROP,)),
        ],
    }


def net_id_of_tag(comment: str | None) -> int | None:
    m = re.fullmatch(r"mvm:t:(\d{1,4})", comment or "")
    return int(m.group(1)) if m else None


def collapse(nets: Iterable[IPv4Network]) -> list[IPv4Network]:
    """Networks merged so none overlaps another (an interval set refuses overlaps)."""
    return list(ipaddress.collapse_addresses(IPv4Network(str(n)) for n in nets))
