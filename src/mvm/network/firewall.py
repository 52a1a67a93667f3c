"""Tenant isolation and NAT in one nftables table of mvm's own, via nft's JSON interface.

Layout (`nft list table inet mvm`)::

    table inet mvm {
      set subnets      { type ipv4_addr; flags interval; }   # one element per tenant
      map from_bridge  { type ifname : verdict; }            # "mvmbr5" : jump t5
      chain forward { type filter hook forward priority filter; policy accept;
        iifname vmap @from_bridge                 # traffic leaving a tenant's bridge
        oifname "mvmbr*" jump to_bridge           # traffic entering any tenant's bridge
      }
      chain to_bridge {
        ct state established,related accept      # replies to what a guest started
        ct status dnat accept                     # port forwards, should mvm add them
        drop                                      # nothing else gets into a tenant
      }
      chain t5 {                                  # one per tenant, flushed and refilled
        oifname "mvmbr5" accept                   # same bridge (seen with br_netfilter)
        ip saddr != 10.192.5.0/24 drop            # spoofed source
        oifname "mvmbr*" drop                     # another tenant's bridge
        meta nfproto ipv4 accept                  # egress, NATed below
        drop                                      # tenant networks are IPv4 only
      }
      chain postrouting { type nat hook postrouting priority srcnat; policy accept;
        ip saddr @subnets oifname != "mvmbr*" masquerade
      }
    }

Why this shape: every per-tenant object lives in the tenant's own chain or is a set/map
element tagged `mvm:t:<net-id>`, so a tenant is added with one atomic transaction that
needs no reading first (chains are flushed and refilled; element adds are idempotent),
and removed by name and tag without touching any other tenant. Rule order between
tenants never matters because dispatch is by map lookup, not by rule position.
Host-to-guest traffic is output, not forward, so it is not filtered here.

Every rule carries a comment (`mvm:base …`, `mvm:t:<net-id> …`) and nft echoes our
JSON expressions back unchanged, so `check()` compares rules exactly, not by name.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from mvm.errors import CommandFailed, Conflict
from mvm.network import plan
from mvm.util import proc

FAMILY = "inet"
TABLE = "mvm"
SUBNETS = "subnets"
FROM_BRIDGE = "from_bridge"
FORWARD = "forward"
TO_BRIDGE = "to_bridge"
POSTROUTING = "postrouting"
BASE_CHAINS = (FORWARD, TO_BRIDGE, POSTROUTING)
TENANT_CHAIN_RE = re.compile(r"t(0|[1-9][0-9]{0,3})")
BRIDGE_WILDCARD = plan.BRIDGE_PREFIX + "*"
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

    @classmethod
    def of(cls, net_id: int, subnet: str | IPv4Network, bridge: str | None = None) -> TenantNet:
        return cls(net_id, IPv4Network(str(subnet)), bridge or plan.bridge_name(net_id))

    @property
    def tag(self) -> str:
        return tag(self.net_id)

    @property
    def chain(self) -> str:
        return tenant_chain(self.net_id)


def tag(net_id: int) -> str:
    return f"mvm:t:{net_id}"


def tenant_chain(net_id: int) -> str:
    return f"t{net_id}"


# -- expressions ---------------------------------------------------------------------

def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


_SADDR: Json = {"payload": {"protocol": "ip", "field": "saddr"}}
_ACCEPT: Json = {"accept": None}
_DROP: Json = {"drop": None}


def _prefix(net: IPv4Network) -> Json:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def base_rules() -> dict[str, list[Rule]]:
    return {
        FORWARD: [
            Rule("mvm:base dispatch by source bridge",
                 ({"vmap": {"key": _meta("iifname"), "data": "@" + FROM_BRIDGE}},)),
            Rule("mvm:base into a tenant bridge",
                 (_match(_meta("oifname"), BRIDGE_WILDCARD), {"jump": {"target": TO_BRIDGE}})),
        ],
        TO_BRIDGE: [
            Rule("mvm:base replies",
                 (_match({"ct": {"key": "state"}}, ["established", "related"], "in"), _ACCEPT)),
            Rule("mvm:base port forwards", (_match({"ct": {"key": "status"}}, "dnat", "in"),
                                            _ACCEPT)),
            Rule("mvm:base no new connections into a tenant", (_DROP,)),
        ],
        POSTROUTING: [
            Rule("mvm:base masquerade tenant egress",
                 (_match(_SADDR, "@" + SUBNETS), _match(_meta("oifname"), BRIDGE_WILDCARD, "!="),
                  {"masquerade": None})),
        ],
    }


def tenant_rules(t: TenantNet) -> list[Rule]:
    return [
        Rule(f"{t.tag} same tenant", (_match(_meta("oifname"), t.bridge), _ACCEPT)),
        Rule(f"{t.tag} spoofed source", (_match(_SADDR, _prefix(t.subnet), "!="), _DROP)),
        Rule(f"{t.tag} other tenant", (_match(_meta("oifname"), BRIDGE_WILDCARD), _DROP)),
        Rule(f"{t.tag} egress", (_match(_meta("nfproto"), "ipv4"), _ACCEPT)),
        Rule(f"{t.tag} not ipv4", (_DROP,)),
    ]


# -- reading -------------------------------------------------------------------------

@dataclass
class Installed:
    """What `nft -j list table inet mvm` shows, reduced to what mvm compares."""

    chains: dict[str, list[tuple[int, Rule]]] = field(default_factory=dict)  # with handles
    base_chains_hooked: dict[str, bool] = field(default_factory=dict)
    subnets: dict[IPv4Network, str | None] = field(default_factory=dict)  # → comment
    from_bridge: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    has_subnets_set: bool = False
    has_from_bridge_map: bool = False

    def tenant_ids(self) -> set[int]:
        """Net-ids with anything of theirs in the table."""
        ids = {int(c[1:]) for c in self.chains if TENANT_CHAIN_RE.fullmatch(c)}
        for comment in [*self.subnets.values(), *(c for _, c in self.from_bridge.values())]:
            n = _net_id_of_tag(comment)
            if n is not None:
                ids.add(n)
        return ids


def _net_id_of_tag(comment: str | None) -> int | None:
    m = re.fullmatch(r"mvm:t:(\d{1,4})", comment or "")
    return int(m.group(1)) if m else None


def _nft(doc: list[Json]) -> None:
    proc.run(["nft", "-j", "-f", "-"], input=json.dumps({"nftables": doc}).encode(),
             timeout=NFT_TIMEOUT)


def list_tables() -> list[tuple[str, str]]:
    """(family, name) of every nftables table in this network namespace."""
    out = json.loads(proc.output(["nft", "-j", "list", "tables"], timeout=NFT_TIMEOUT))
    return [(o["table"]["family"], o["table"]["name"]) for o in out["nftables"] if "table" in o]


def read() -> Installed | None:
    """mvm's table as installed, or None when there is none."""
    try:
        text = proc.output(["nft", "-j", "list", "table", FAMILY, TABLE], timeout=NFT_TIMEOUT)
    except CommandFailed as e:
        if "No such file or directory" in e.stderr or e.returncode == 127:
            return None  # no table, or no nft at all: nothing of mvm's is installed
        raise
    state = Installed()
    for obj in json.loads(text)["nftables"]:
        if "chain" in obj:
            c = obj["chain"]
            state.chains.setdefault(c["name"], [])
            state.base_chains_hooked[c["name"]] = "hook" in c
        elif "rule" in obj:
            r = obj["rule"]
            state.chains.setdefault(r["chain"], []).append(
                (r["handle"], Rule(r.get("comment", ""), tuple(r["expr"]))))
        elif "set" in obj and obj["set"]["name"] == SUBNETS:
            state.has_subnets_set = True
            for item in obj["set"].get("elem", []):
                val, comment = _elem(item)
                if isinstance(val, dict) and "prefix" in val:
                    net = IPv4Network(f"{val['prefix']['addr']}/{val['prefix']['len']}")
                elif isinstance(val, str):
                    net = IPv4Network(val)
                else:  # a range: mvm never adds one
                    continue
                state.subnets[net] = comment
        elif "map" in obj and obj["map"]["name"] == FROM_BRIDGE:
            state.has_from_bridge_map = True
            for key, verdict in obj["map"].get("elem", []):
                name, comment = _elem(key)
                target = verdict.get("jump", {}).get("target") if isinstance(verdict, dict) \
                    else None
                state.from_bridge[str(name)] = (target, comment)
    return state


def _elem(e: Any) -> tuple[Any, str | None]:
    if isinstance(e, dict) and "elem" in e:
        return e["elem"]["val"], e["elem"].get("comment")
    return e, None


# -- writing -------------------------------------------------------------------------

@contextmanager
def _locked() -> Iterator[None]:
    """Serialise read-modify-write of mvm's table between mvm processes on this host."""
    with LOCK.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _obj(kind: str, **body: Any) -> Json:
    return {kind: {"family": FAMILY, "table": TABLE, **body}}


def _base_doc() -> list[Json]:
    doc: list[Json] = [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": _obj("set", name=SUBNETS, type="ipv4_addr", flags=["interval"])},
        {"add": _obj("map", name=FROM_BRIDGE, type="ifname", map="verdict")},
        {"add": _obj("chain", name=TO_BRIDGE)},
        {"add": _obj("chain", name=FORWARD, type="filter", hook="forward", prio=0,
                     policy="accept")},
        {"add": _obj("chain", name=POSTROUTING, type="nat", hook="postrouting", prio=100,
                     policy="accept")},
    ]
    for chain, rules in base_rules().items():
        doc += _refill(chain, rules)
    return doc


def _refill(chain: str, rules: list[Rule]) -> list[Json]:
    doc = [{"add": _obj("chain", name=chain)}, {"flush": _obj("chain", name=chain)}]
    doc += [{"add": _obj("rule", chain=chain, expr=list(r.expr), comment=r.comment)}
            for r in rules]
    return doc


def _subnet_elem(net: IPv4Network, comment: str | None) -> Json:
    val: Json = _prefix(net)
    return {"elem": {"val": val, "comment": comment}} if comment else val


def _bridge_elem(bridge: str, target: str | None, comment: str | None) -> list[Any]:
    key: Any = {"elem": {"val": bridge, "comment": comment}} if comment else bridge
    return [key, {"jump": {"target": target}}]


def _tenant_doc(t: TenantNet) -> list[Json]:
    return [
        *_refill(t.chain, tenant_rules(t)),
        {"add": _obj("element", name=FROM_BRIDGE,
                     elem=[_bridge_elem(t.bridge, t.chain, t.tag)])},
        {"add": _obj("element", name=SUBNETS, elem=[_subnet_elem(t.subnet, t.tag)])},
    ]


def _removal_doc(state: Installed, keep: set[int], wanted: dict[int, TenantNet]) -> list[Json]:
    """Delete whatever the table holds that is not in `wanted` (or kept untouched)."""
    doc: list[Json] = []
    for bridge, (target, comment) in state.from_bridge.items():
        n = _net_id_of_tag(comment)
        if n in keep:
            continue
        t = wanted.get(n) if n is not None else None
        if t is None or t.bridge != bridge or target != t.chain:
            # delete by key alone: the element's verdict may point anywhere
            doc.append({"delete": _obj("element", name=FROM_BRIDGE, elem=[bridge])})
    for net, comment in state.subnets.items():
        n = _net_id_of_tag(comment)
        if n in keep:
            continue
        t = wanted.get(n) if n is not None else None
        if t is None or t.subnet != net:
            doc.append({"delete": _obj("element", name=SUBNETS, elem=[_prefix(net)])})
    for chain in state.chains:
        if chain in BASE_CHAINS:
            continue
        m = TENANT_CHAIN_RE.fullmatch(chain)
        n = int(m.group(1)) if m else None
        if n in keep or n in wanted:
            continue
        # tenant chain of a tenant that is gone, or a chain mvm never makes
        doc.append({"flush": _obj("chain", name=chain)})
        doc.append({"delete": _obj("chain", name=chain)})
    return doc


def ensure_tenant(net_id: int, subnet: str | IPv4Network, bridge: str | None = None) -> None:
    """Install the tenant's isolation and NAT (idempotent, one atomic nft transaction).

    Leftovers of the same net-id with another subnet or bridge are replaced; other
    tenants are not touched.
    """
    t = TenantNet.of(net_id, subnet, bridge)
    with _locked():
        state = read()
        stale: list[Json] = []
        if state is not None:
            for net, comment in state.subnets.items():
                other = _net_id_of_tag(comment)
                if other != net_id and net.overlaps(t.subnet):
                    who = f"net-id {other}" if other is not None else "an untagged entry"
                    raise Conflict(f"subnet {t.subnet} of net-id {net_id} overlaps {net} of {who}",
                                   "tenant subnets must not overlap")
            stale = _removal_doc(state, keep=state.tenant_ids() - {net_id}, wanted={net_id: t})
        _nft(_base_doc() + stale + _tenant_doc(t))


def remove_tenant(net_id: int) -> bool:
    """Delete exactly this tenant's chain and tagged elements; True if any existed."""
    with _locked():
        state = read()
        if state is None:
            return False
        others = state.tenant_ids() - {net_id}
        doc = _removal_doc(state, keep=others, wanted={})
        # _removal_doc also sweeps untagged leftovers; that is mvm's own table, so fine
        if not doc:
            return False
        _nft(doc)
        return True


def remove_all_if_empty() -> bool:
    """Drop mvm's table when no tenant has anything left in it; True if it was dropped."""
    with _locked():
        state = read()
        if state is None or state.tenant_ids() or state.subnets or state.from_bridge:
            return False
        _nft([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
        return True


def installed_tenants() -> dict[int, IPv4Network]:
    """Net-id → subnet of every tenant whose subnet is in the table."""
    state = read()
    if state is None:
        return {}
    out = {}
    for net, comment in state.subnets.items():
        n = _net_id_of_tag(comment)
        if n is not None:
            out[n] = net
    return out


# -- drift -----------------------------------------------------------------------------

@dataclass
class Drift:
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra)


def check(expected: Iterable[TenantNet]) -> Drift:
    """Compare the installed table with what these tenants need, rule by rule."""
    wanted = {t.net_id: t for t in expected}
    drift = Drift()
    state = read()
    if state is None:
        if wanted:  # no tenants need no table
            drift.missing.append(f"nftables table {FAMILY} {TABLE}")
        return drift
    if not state.has_subnets_set:
        drift.missing.append(f"set {SUBNETS}")
    if not state.has_from_bridge_map:
        drift.missing.append(f"map {FROM_BRIDGE}")
    want_chains: dict[str, list[Rule]] = dict(base_rules())
    for t in wanted.values():
        want_chains[t.chain] = tenant_rules(t)
    for chain, rules in want_chains.items():
        have = [r for _, r in state.chains.get(chain, [])]
        if chain not in state.chains:
            drift.missing.append(f"chain {chain}")
        elif chain in (FORWARD, POSTROUTING) and not state.base_chains_hooked.get(chain):
            drift.missing.append(f"hook of chain {chain}")
        missing = [r for r in rules if r not in have]
        extra = [r for r in have if r not in rules]
        drift.missing += [f"rule in {chain}: {r.comment}" for r in missing]
        drift.extra += [f"rule in {chain}: {r.comment or '(no comment)'}" for r in extra]
        if not missing and not extra and have != rules:
            drift.extra.append(f"rules of chain {chain} out of order")
    for chain in state.chains:
        if chain not in want_chains:
            drift.extra.append(f"chain {chain}")
    for t in wanted.values():
        if state.subnets.get(t.subnet, "") != t.tag:
            drift.missing.append(f"subnet {t.subnet} of net-id {t.net_id} in set {SUBNETS}")
        if state.from_bridge.get(t.bridge) != (t.chain, t.tag):
            drift.missing.append(f"{t.bridge} → jump {t.chain} in map {FROM_BRIDGE}")
    for net, comment in state.subnets.items():
        n = _net_id_of_tag(comment)
        if n not in wanted or wanted[n].subnet != net:
            drift.extra.append(f"subnet {net} in set {SUBNETS}")
    for bridge, (target, comment) in state.from_bridge.items():
        n = _net_id_of_tag(comment)
        if n not in wanted or wanted[n].bridge != bridge or target != wanted[n].chain:
            drift.extra.append(f"{bridge} in map {FROM_BRIDGE}")
    return drift


def sync(expected: Iterable[TenantNet]) -> None:
    """Make the table exactly what these tenants need (one atomic transaction)."""
    wanted = {t.net_id: t for t in expected}
    nets = sorted(wanted.values(), key=lambda t: t.subnet)
    for a, b in itertools.pairwise(nets):  # sorted: any overlap shows between neighbours
        if a.subnet.overlaps(b.subnet):
            raise Conflict(f"subnets of net-ids {a.net_id} and {b.net_id} overlap "
                           f"({a.subnet}, {b.subnet})", "tenant subnets must not overlap")
    with _locked():
        state = read()
        doc = _base_doc()
        if state is not None:
            doc += _removal_doc(state, keep=set(), wanted=wanted)
        for t in wanted.values():
            doc += _tenant_doc(t)
        _nft(doc)
