"""Tenant isolation, a closed host, anti-spoofing and NAT in nftables, via nft's JSON interface.

Each state home has two tables of its own, both named `mvm-<home tag>` (`Firewall.name`; the
default `mvm` serves tests and tools): one `inet`, one `bridge`. Layout::

    table inet mvm-<tag> {
      set subnets   { type ipv4_addr; flags interval; }   # one element per tenant
      set hostnets  { type ipv4_addr; flags interval; }   # the host's own networks
      map from_bridge { type ifname : verdict; }          # "mvmbr5" : jump t5
      map to_host     { type ifname : verdict; }          # "mvmbr5" : jump h5
      chain input { type filter hook input priority filter; policy accept;
        iifname vmap @to_host                    # a guest talking to the host itself
      }
      chain forward { type filter hook forward priority filter; policy accept;
        iifname vmap @from_bridge                # traffic leaving a tenant's bridge
        oifname "mvmbr*" jump to_bridge          # traffic entering any tenant's bridge
      }
      chain to_bridge {
        ct state established,related accept      # replies to what a guest started
        ct status dnat accept                     # port forwards, should mvm add them
        drop                                      # nothing else gets into a tenant
      }
      chain refuse {                              # a refusal the guest sees at once
        meta l4proto tcp reject with tcp reset
        reject with icmpx admin-prohibited
      }
      chain closed {                              # where no guest may go
        meta nfproto != ipv4 goto refuse          # tenant networks are IPv4 only
        oifname "mvmbr*" goto refuse              # another tenant's bridge
        ip daddr 169.254.0.0/16 goto refuse       # link-local: metadata services
        ip daddr @hostnets goto refuse            # the host's own networks
      }
      chain h5 {                                  # one per tenant: to the host
        ct state established,related accept      # replies to what the host started
        ip daddr 10.192.5.1 icmp type echo-request accept   # ping its own gateway
        goto refuse                               # no host service, any address
      }
      chain t5 {                                  # one per tenant: forwarded
        oifname "mvmbr5" accept                   # same bridge (seen with br_netfilter)
        ip saddr != 10.192.5.0/24 drop            # spoofed source
        jump closed
        ip daddr 198.51.100.0/24 goto refuse      # the tenant's egress deny list
        ip daddr 203.0.113.0/24 accept            # its allow list, when it has one…
        goto refuse                               # …which then is all it may reach
        accept                                    # (without an allow list) egress, NATed
      }
      chain postrouting { type nat hook postrouting priority srcnat; policy accept;
        ip saddr @subnets oifname != "mvmbr*" masquerade
      }
    }
    table bridge mvm-<tag> {
      set ports { type ifname . ether_addr . ipv4_addr; }  # "mvt…" . its MAC . its IP
      chain prerouting { type filter hook prerouting priority -200; policy accept;
        iifname "mvt*" jump from_port             # every frame a TAP sends
      }
      chain from_port {
        ether type ip iifname . ether saddr . ip saddr @ports return
        ether type arp iifname . ether saddr . arp saddr ip @ports
                       iifname . arp saddr ether . arp saddr ip @ports return
        drop                                      # another MAC or IP, IPv6, anything else
      }
    }

Why this shape: every per-tenant object lives in the tenant's own chains or is a set/map
element tagged `mvm:t:<net-id>`, so a tenant is added with one atomic transaction that
needs no reading first (chains are flushed and refilled; element adds are idempotent),
and removed by name and tag without touching any other tenant. Rule order between
tenants never matters because dispatch is by map lookup, not by rule position.
Host-to-guest traffic is output, not forward, so it is not filtered here; its replies
are let in by `ct state`. A TAP (`mvt*`) not in `ports` sends nothing; an instance's port
stays in it from its first start until it is destroyed (same TAP, MAC and IP each start).

Every rule carries a comment (`mvm:base …`, `mvm:t:<net-id> …`) and nft echoes our
JSON expressions back unchanged, so `check()` compares rules exactly, not by name.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from mvm.errors import CommandFailed, Conflict, InvalidInput
from mvm.network import plan
from mvm.util import proc

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
LOCK = Path("/run/mvm-network.lock")
NFT_TIMEOUT = 30.0

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


def _prefix(net: IPv4Network) -> Json | str:
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
            Rule("mvm:base link-local", (_match(_DADDR, _prefix(LINK_LOCAL)), _REFUSE)),
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
        Rule(f"{t.tag} spoofed source", (_match(_SADDR, _prefix(t.subnet), "!="), _DROP)),
        Rule(f"{t.tag} closed host", ({"jump": {"target": CLOSED}},)),
    ]
    rules += [Rule(f"{t.tag} egress deny {n}", (_match(_DADDR, _prefix(n)), _REFUSE))
              for n in t.egress_deny]
    if t.egress_allow:
        rules += [Rule(f"{t.tag} egress allow {n}", (_match(_DADDR, _prefix(n)), _ACCEPT))
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


# -- reading -------------------------------------------------------------------------

@dataclass
class Installed:
    """What `nft -j list table inet|bridge <name>` shows, reduced to what mvm compares."""

    chains: dict[str, list[tuple[int, Rule]]] = field(default_factory=dict)  # with handles
    base_chains_hooked: dict[str, bool] = field(default_factory=dict)
    subnets: dict[IPv4Network, str | None] = field(default_factory=dict)  # → comment
    hostnets: set[IPv4Network] = field(default_factory=set)
    maps: dict[str, dict[str, tuple[str | None, str | None]]] = field(default_factory=dict)
    sets: set[str] = field(default_factory=set)  # names of the sets and maps present
    bridge_chains: dict[str, list[tuple[int, Rule]]] = field(default_factory=dict)
    bridge_hooked: dict[str, bool] = field(default_factory=dict)
    ports: dict[Port, str | None] = field(default_factory=dict)  # → comment
    has_bridge_table: bool = False

    @property
    def from_bridge(self) -> dict[str, tuple[str | None, str | None]]:
        return self.maps.get(FROM_BRIDGE, {})

    @property
    def to_host(self) -> dict[str, tuple[str | None, str | None]]:
        return self.maps.get(TO_HOST, {})

    def tenant_ids(self) -> set[int]:
        """Net-ids with anything of theirs in the tables."""
        ids = {int(c[1:]) for c in self.chains if TENANT_CHAIN_RE.fullmatch(c)}
        comments = [*self.subnets.values(), *self.ports.values()]
        for m in self.maps.values():
            comments += [c for _, c in m.values()]
        for comment in comments:
            n = _net_id_of_tag(comment)
            if n is not None:
                ids.add(n)
        return ids


def _net_id_of_tag(comment: str | None) -> int | None:
    m = re.fullmatch(r"mvm:t:(\d{1,4})", comment or "")
    return int(m.group(1)) if m else None


def _port_net_id(comment: str | None) -> int:
    n = _net_id_of_tag(comment)
    return -1 if n is None else n


def _nft(doc: list[Json]) -> None:
    proc.run(["nft", "-j", "-f", "-"], input=json.dumps({"nftables": doc}).encode(),
             timeout=NFT_TIMEOUT)


def list_tables() -> list[tuple[str, str]]:
    """(family, name) of every nftables table in this network namespace."""
    out = json.loads(proc.output(["nft", "-j", "list", "tables"], timeout=NFT_TIMEOUT))
    return [(o["table"]["family"], o["table"]["name"]) for o in out["nftables"] if "table" in o]


def _list(family: str, name: str) -> list[Json] | None:
    try:
        text = proc.output(["nft", "-j", "list", "table", family, name], timeout=NFT_TIMEOUT)
    except CommandFailed as e:
        if "No such file or directory" in e.stderr or e.returncode == 127:
            return None  # no table, or no nft at all: nothing of mvm's is installed
        raise
    return list(json.loads(text)["nftables"])


def _net(val: Any) -> IPv4Network | None:
    if isinstance(val, dict) and "prefix" in val:
        return IPv4Network(f"{val['prefix']['addr']}/{val['prefix']['len']}")
    if isinstance(val, str):
        return IPv4Network(val)
    if isinstance(val, dict) and "range" in val:  # an interval set may show a range
        lo, hi = (IPv4Address(a) for a in val["range"])
        nets = list(ipaddress.summarize_address_range(lo, hi))
        return nets[0] if len(nets) == 1 else None
    return None


def _elem(e: Any) -> tuple[Any, str | None]:
    if isinstance(e, dict) and "elem" in e:
        return e["elem"]["val"], e["elem"].get("comment")
    return e, None


def _obj(kind: str, family: str, table: str, **body: Any) -> Json:
    return {kind: {"family": family, "table": table, **body}}


def _refill(family: str, table: str, chain: str, rules: list[Rule]) -> list[Json]:
    doc = [{"add": _obj("chain", family, table, name=chain)},
           {"flush": _obj("chain", family, table, name=chain)}]
    doc += [{"add": _obj("rule", family, table, chain=chain, expr=list(r.expr),
                         comment=r.comment)} for r in rules]
    return doc


def _tagged(val: Any, comment: str | None) -> Any:
    return {"elem": {"val": val, "comment": comment}} if comment else val


def _port_val(p: Port) -> Json:
    return {"concat": [p.name, p.mac, str(p.ip)]}


# -- the two tables of one state home ----------------------------------------------------

def _chain_or_rule(obj: dict[str, Any], chains: dict[str, list[tuple[int, Rule]]],
                   hooked: dict[str, bool]) -> bool:
    """Read a listed chain (whether it is a base chain) or rule into `chains`; False: neither."""
    if "chain" in obj:
        c = obj["chain"]
        chains.setdefault(c["name"], [])
        hooked[c["name"]] = "hook" in c
    elif "rule" in obj:
        r = obj["rule"]
        chains.setdefault(r["chain"], []).append((r["handle"], Rule(r.get("comment", ""), tuple(r["expr"]))))
    else:
        return False
    return True


@dataclass(frozen=True)
class Firewall:
    """The nftables tables of one state home (`inet <name>` and `bridge <name>`)."""

    name: str = TABLE

    # -- reading

    def read(self) -> Installed | None:
        """The home's tables as installed, or None when there is no inet table."""
        objs = _list(FAMILY, self.name)
        if objs is None:
            return None
        state = Installed()
        for obj in objs:
            if _chain_or_rule(obj, state.chains, state.base_chains_hooked):
                pass
            elif "set" in obj and obj["set"]["name"] in (SUBNETS, HOSTNETS):
                s = obj["set"]
                state.sets.add(s["name"])
                for item in s.get("elem", []):
                    val, comment = _elem(item)
                    net = _net(val)
                    if net is None:
                        continue
                    if s["name"] == SUBNETS:
                        state.subnets[net] = comment
                    else:
                        state.hostnets.add(net)
            elif "map" in obj and obj["map"]["name"] in (FROM_BRIDGE, TO_HOST):
                mp = obj["map"]
                state.sets.add(mp["name"])
                entries = state.maps.setdefault(mp["name"], {})
                for key, verdict in mp.get("elem", []):
                    name, comment = _elem(key)
                    target = verdict.get("jump", {}).get("target") \
                        if isinstance(verdict, dict) else None
                    entries[str(name)] = (target, comment)
        for obj in _list(BRIDGE_FAMILY, self.name) or []:
            if "table" in obj:
                state.has_bridge_table = True
            elif _chain_or_rule(obj, state.bridge_chains, state.bridge_hooked):
                pass
            elif "set" in obj and obj["set"]["name"] == PORTS:
                state.sets.add(PORTS)
                for item in obj["set"].get("elem", []):
                    val, comment = _elem(item)
                    parts = val.get("concat") if isinstance(val, dict) else None
                    if parts and len(parts) == 3:
                        state.ports[Port.of(parts[0], parts[1], parts[2],
                                            _port_net_id(comment))] = comment
        return state

    def installed_tenants(self) -> dict[int, IPv4Network]:
        """Net-id → subnet of every tenant whose subnet is in the table."""
        state = self.read()
        if state is None:
            return {}
        out = {}
        for net, comment in state.subnets.items():
            n = _net_id_of_tag(comment)
            if n is not None:
                out[n] = net
        return out

    def exists(self) -> bool:
        return (FAMILY, self.name) in list_tables()

    # -- writing

    def _base_doc(self, hostnets: Iterable[IPv4Network]) -> list[Json]:
        f, n = FAMILY, self.name
        doc: list[Json] = [
            {"add": {"table": {"family": f, "name": n}}},
            {"add": _obj("set", f, n, name=SUBNETS, type="ipv4_addr", flags=["interval"])},
            {"add": _obj("set", f, n, name=HOSTNETS, type="ipv4_addr", flags=["interval"])},
            {"flush": _obj("set", f, n, name=HOSTNETS)},
            {"add": _obj("map", f, n, name=FROM_BRIDGE, type="ifname", map="verdict")},
            {"add": _obj("map", f, n, name=TO_HOST, type="ifname", map="verdict")},
            {"add": _obj("chain", f, n, name=TO_BRIDGE)},
            {"add": _obj("chain", f, n, name=REFUSE)},
            {"add": _obj("chain", f, n, name=CLOSED)},
            {"add": _obj("chain", f, n, name=INPUT, type="filter", hook="input", prio=0,
                         policy="accept")},
            {"add": _obj("chain", f, n, name=FORWARD, type="filter", hook="forward", prio=0,
                         policy="accept")},
            {"add": _obj("chain", f, n, name=POSTROUTING, type="nat", hook="postrouting",
                         prio=100, policy="accept")},
        ]
        nets = [_prefix(h) for h in hostnets]
        if nets:
            doc.append({"add": _obj("element", f, n, name=HOSTNETS, elem=nets)})
        for chain in (REFUSE, CLOSED, TO_BRIDGE, INPUT, FORWARD, POSTROUTING):
            doc += _refill(f, n, chain, base_rules()[chain])
        b = BRIDGE_FAMILY
        doc += [
            {"add": {"table": {"family": b, "name": n}}},
            {"add": _obj("set", b, n, name=PORTS, type=["ifname", "ether_addr", "ipv4_addr"])},
            {"add": _obj("chain", b, n, name=FROM_PORT)},
            {"add": _obj("chain", b, n, name=PREROUTING, type="filter", hook="prerouting",
                         prio=-200, policy="accept")},
        ]
        for chain in (FROM_PORT, PREROUTING):
            doc += _refill(b, n, chain, bridge_rules()[chain])
        return doc

    def _tenant_doc(self, t: TenantNet) -> list[Json]:
        f, n = FAMILY, self.name
        return [
            *_refill(f, n, t.chain, tenant_rules(t)),
            *_refill(f, n, t.host_chain, host_rules(t)),
            {"add": _obj("element", f, n, name=FROM_BRIDGE,
                         elem=[[_tagged(t.bridge, t.tag), {"jump": {"target": t.chain}}]])},
            {"add": _obj("element", f, n, name=TO_HOST,
                         elem=[[_tagged(t.bridge, t.tag), {"jump": {"target": t.host_chain}}]])},
            {"add": _obj("element", f, n, name=SUBNETS, elem=[_tagged(_prefix(t.subnet), t.tag)])},
        ]

    def _removal_doc(self, state: Installed, keep: set[int], wanted: dict[int, TenantNet],
                     ports: dict[str, Port] | None = None) -> list[Json]:
        """Delete whatever the tables hold that is not in `wanted` (or kept untouched).

        `ports` None leaves ports of wanted tenants alone; a dict removes those not in it.
        """
        f, n = FAMILY, self.name
        doc: list[Json] = []
        for mname, target_of in ((FROM_BRIDGE, lambda t: t.chain),
                                 (TO_HOST, lambda t: t.host_chain)):
            for bridge, (target, comment) in state.maps.get(mname, {}).items():
                nid = _net_id_of_tag(comment)
                if nid in keep:
                    continue
                t = wanted.get(nid) if nid is not None else None
                if t is None or t.bridge != bridge or target != target_of(t):
                    # delete by key alone: the element's verdict may point anywhere
                    doc.append({"delete": _obj("element", f, n, name=mname, elem=[bridge])})
        for net, comment in state.subnets.items():
            nid = _net_id_of_tag(comment)
            if nid in keep:
                continue
            t = wanted.get(nid) if nid is not None else None
            if t is None or t.subnet != net:
                doc.append({"delete": _obj("element", f, n, name=SUBNETS, elem=[_prefix(net)])})
        for p, comment in state.ports.items():
            nid = _net_id_of_tag(comment)
            if nid in keep:
                continue
            if nid in wanted and (ports is None or ports.get(p.name) == p):
                continue
            doc.append({"delete": _obj("element", BRIDGE_FAMILY, n, name=PORTS,
                                       elem=[_port_val(p)])})
        for chain in state.chains:
            if chain in BASE_CHAINS:
                continue
            m = TENANT_CHAIN_RE.fullmatch(chain)
            nid = int(m.group(1)) if m else None
            if nid in keep or nid in wanted:
                continue
            # a chain of a tenant that is gone, or a chain mvm never makes
            doc.append({"flush": _obj("chain", f, n, name=chain)})
            doc.append({"delete": _obj("chain", f, n, name=chain)})
        return doc

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write of the tables between mvm processes on this host."""
        with LOCK.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def ensure_tenant(self, t: TenantNet, hostnets: Iterable[IPv4Network] = ()) -> None:
        """Install the tenant's isolation, closed host and NAT (idempotent, one atomic nft
        transaction), and refresh the host's own networks in `hostnets`.

        Leftovers of the same net-id with another subnet or bridge are replaced; other
        tenants are not touched.
        """
        with self._locked():
            state = self.read()
            stale: list[Json] = []
            if state is not None:
                for net, comment in state.subnets.items():
                    other = _net_id_of_tag(comment)
                    if other != t.net_id and net.overlaps(t.subnet):
                        who = f"net-id {other}" if other is not None else "an untagged entry"
                        raise Conflict(f"subnet {t.subnet} of net-id {t.net_id} overlaps {net} "
                                       f"of {who}", "tenant subnets must not overlap")
                stale = self._removal_doc(state, keep=state.tenant_ids() - {t.net_id},
                                          wanted={t.net_id: t})
            _nft(self._base_doc(collapse(hostnets)) + stale + self._tenant_doc(t))

    def remove_tenant(self, net_id: int) -> bool:
        """Delete exactly this tenant's chains and tagged elements; True if any existed."""
        with self._locked():
            state = self.read()
            if state is None:
                return False
            others = state.tenant_ids() - {net_id}
            doc = self._removal_doc(state, keep=others, wanted={})
            # _removal_doc also sweeps untagged leftovers; that is mvm's own table, so fine
            if not doc:
                return False
            _nft(doc)
            return True

    def ensure_port(self, port: Port) -> None:
        """Let `port` send frames from its MAC and IP only (idempotent; one nft call, no read:
        a port's name, MAC and IP are fixed for the life of its instance)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", port.name):
            raise ValueError(f"not an interface name: {port.name!r}")
        try:
            _nft([{"add": _obj("element", BRIDGE_FAMILY, self.name, name=PORTS,
                               elem=[_tagged(_port_val(port), tag(port.net_id))])}])
        except CommandFailed as e:
            raise Conflict(f"cannot allow {port.name} in firewall table {self.name}: {e.stderr.strip()}",
                           "`mvm net verify --repair` restores the tables") from e

    def remove_port(self, name: str) -> bool:
        """Forget what `name` may send (its frames are then all dropped); True if it was known."""
        with self._locked():
            try:
                text = proc.output(["nft", "-j", "list", "set", BRIDGE_FAMILY, self.name, PORTS],
                                   timeout=NFT_TIMEOUT)
            except CommandFailed as e:
                if "No such file or directory" in e.stderr or e.returncode == 127:
                    return False  # no table: nothing to forget
                raise
            doc = []
            for obj in json.loads(text)["nftables"]:
                for item in obj.get("set", {}).get("elem", []):
                    val, _ = _elem(item)
                    parts = val.get("concat") if isinstance(val, dict) else None
                    if parts and parts[0] == name:
                        doc.append({"delete": _obj("element", BRIDGE_FAMILY, self.name,
                                                   name=PORTS, elem=[val])})
            if doc:
                _nft(doc)
            return bool(doc)

    def remove_all_if_empty(self) -> bool:
        """Drop the home's tables when no tenant has anything left in them; True if dropped."""
        with self._locked():
            state = self.read()
            if state is None or state.tenant_ids() or state.subnets or state.from_bridge \
                    or state.ports:
                return False
            self._drop()
            return True

    def remove_all(self) -> None:
        """Drop both tables whatever they hold (a state home's leftovers taken over)."""
        with self._locked():
            self._drop()

    def _drop(self) -> None:
        have = list_tables()
        doc = [{"delete": {"table": {"family": fam, "name": self.name}}}
               for fam in (FAMILY, BRIDGE_FAMILY) if (fam, self.name) in have]
        if doc:
            _nft(doc)

    # -- drift

    def check(self, expected: Iterable[TenantNet], hostnets: Iterable[IPv4Network] = (),
              ports: Iterable[Port] | None = None) -> Drift:
        """Compare the installed tables with what these tenants (and ports) need, rule by rule.

        `ports` None skips comparing the ports set.
        """
        wanted = {t.net_id: t for t in expected}
        drift = Drift()
        state = self.read()
        if state is None:
            if wanted:  # no tenants need no table
                drift.missing.append(f"nftables table {FAMILY} {self.name}")
            return drift
        for s in (SUBNETS, HOSTNETS, FROM_BRIDGE, TO_HOST):
            if s not in state.sets:
                drift.missing.append(f"set {s}")
        want_chains: dict[str, list[Rule]] = dict(base_rules())
        for t in wanted.values():
            want_chains[t.chain] = tenant_rules(t)
            want_chains[t.host_chain] = host_rules(t)
        _compare(drift, state.chains, state.base_chains_hooked, want_chains, HOOKED, "")
        if not state.has_bridge_table:
            drift.missing.append(f"nftables table {BRIDGE_FAMILY} {self.name}")
        else:
            if PORTS not in state.sets:
                drift.missing.append(f"set {PORTS}")
            _compare(drift, state.bridge_chains, state.bridge_hooked, bridge_rules(),
                     (PREROUTING,), "bridge ")
        want_hostnets = set(collapse(hostnets))
        if state.hostnets != want_hostnets:
            drift.missing += [f"host network {n} in set {HOSTNETS}"
                              for n in sorted(want_hostnets - state.hostnets)]
            drift.extra += [f"host network {n} in set {HOSTNETS}"
                            for n in sorted(state.hostnets - want_hostnets)]
        for t in wanted.values():
            if state.subnets.get(t.subnet, "") != t.tag:
                drift.missing.append(f"subnet {t.subnet} of net-id {t.net_id} in set {SUBNETS}")
            if state.from_bridge.get(t.bridge) != (t.chain, t.tag):
                drift.missing.append(f"{t.bridge} → jump {t.chain} in map {FROM_BRIDGE}")
            if state.to_host.get(t.bridge) != (t.host_chain, t.tag):
                drift.missing.append(f"{t.bridge} → jump {t.host_chain} in map {TO_HOST}")
        for net, comment in state.subnets.items():
            nid = _net_id_of_tag(comment)
            if nid not in wanted or wanted[nid].subnet != net:
                drift.extra.append(f"subnet {net} in set {SUBNETS}")
        for mname, target_of in ((FROM_BRIDGE, lambda t: t.chain),
                                 (TO_HOST, lambda t: t.host_chain)):
            for bridge, (target, comment) in state.maps.get(mname, {}).items():
                nid = _net_id_of_tag(comment)
                if nid not in wanted or wanted[nid].bridge != bridge \
                        or target != target_of(wanted[nid]):
                    drift.extra.append(f"{bridge} in map {mname}")
        if ports is not None:
            want_ports = {p: tag(p.net_id) for p in ports}
            have_ports = {p: c for p, c in state.ports.items()}
            have_keys = {(p.name, p.mac, p.ip) for p in have_ports}
            for p in want_ports:
                if (p.name, p.mac, p.ip) not in have_keys:
                    drift.missing.append(f"port {p.name} ({p.mac}, {p.ip}) in set {PORTS}")
            want_keys = {(p.name, p.mac, p.ip) for p in want_ports}
            for p in have_ports:
                if (p.name, p.mac, p.ip) not in want_keys:
                    drift.extra.append(f"port {p.name} ({p.mac}, {p.ip}) in set {PORTS}")
        return drift

    def sync(self, expected: Iterable[TenantNet], hostnets: Iterable[IPv4Network] = (),
             ports: Iterable[Port] | None = None) -> None:
        """Make the tables exactly what these tenants (and ports) need (one atomic transaction)."""
        wanted = {t.net_id: t for t in expected}
        nets = sorted(wanted.values(), key=lambda t: t.subnet)
        for a, b in itertools.pairwise(nets):  # sorted: any overlap shows between neighbours
            if a.subnet.overlaps(b.subnet):
                raise Conflict(f"subnets of net-ids {a.net_id} and {b.net_id} overlap "
                               f"({a.subnet}, {b.subnet})", "tenant subnets must not overlap")
        want_ports = {p.name: p for p in ports} if ports is not None else None
        with self._locked():
            state = self.read()
            doc = self._base_doc(collapse(hostnets))
            if state is not None:
                doc += self._removal_doc(state, keep=set(), wanted=wanted, ports=want_ports)
            for t in wanted.values():
                doc += self._tenant_doc(t)
            have = set(state.ports) if state is not None else set()
            for p in (want_ports or {}).values():
                if p.net_id in wanted and not any(
                        (h.name, h.mac, h.ip) == (p.name, p.mac, p.ip) for h in have):
                    doc.append({"add": _obj("element", BRIDGE_FAMILY, self.name, name=PORTS,
                                            elem=[_tagged(_port_val(p), tag(p.net_id))])})
            _nft(doc)


def collapse(nets: Iterable[IPv4Network]) -> list[IPv4Network]:
    """Networks merged so none overlaps another (an interval set refuses overlaps)."""
    return list(ipaddress.collapse_addresses(IPv4Network(str(n)) for n in nets))


def _compare(drift: Drift, have_chains: dict[str, list[tuple[int, Rule]]],
             hooked: dict[str, bool], want_chains: dict[str, list[Rule]],
             hooks: tuple[str, ...], prefix: str) -> None:
    for chain, rules in want_chains.items():
        have = [r for _, r in have_chains.get(chain, [])]
        if chain not in have_chains:
            drift.missing.append(f"{prefix}chain {chain}")
        elif chain in hooks and not hooked.get(chain):
            drift.missing.append(f"hook of {prefix}chain {chain}")
        missing = [r for r in rules if r not in have]
        extra = [r for r in have if r not in rules]
        drift.missing += [f"rule in {prefix}{chain}: {r.comment}" for r in missing]
        drift.extra += [f"rule in {prefix}{chain}: {r.comment or '(no comment)'}" for r in extra]
        if not missing and not extra and have != rules:
            drift.extra.append(f"rules of {prefix}chain {chain} out of order")
    for chain in have_chains:
        if chain not in want_chains:
            drift.extra.append(f"{prefix}chain {chain}")


@dataclass
class Drift:
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra)
