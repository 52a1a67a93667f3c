"""The firewall in nftables: the tables of one state home read back from `nft -j list`
(`Installed`), and changed in one atomic `nft -j -f -` transaction each, under a host-wide
lock (`Tables`)."""

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

from mvm.errors import CommandFailed, Conflict
from mvm.network.firewall import rules as ruleset
from mvm.util import proc

LOCK = Path("/run/mvm-network.lock")
NFT_TIMEOUT = 30.0


@dataclass
class Installed:
    """What `nft -j list table inet|bridge <name>` shows, reduced to what mvm compares."""

    chains: dict[str, list[tuple[int, ruleset.Rule]]] = field(default_factory=dict)  # with handles
    base_chains_hooked: dict[str, bool] = field(default_factory=dict)
    subnets: dict[IPv4Network, str | None] = field(default_factory=dict)  # → comment
    hostnets: set[IPv4Network] = field(default_factory=set)
    maps: dict[str, dict[str, tuple[str | None, str | None]]] = field(default_factory=dict)
    sets: set[str] = field(default_factory=set)  # names of the sets and maps present
    bridge_chains: dict[str, list[tuple[int, ruleset.Rule]]] = field(default_factory=dict)
    bridge_hooked: dict[str, bool] = field(default_factory=dict)
    ports: dict[ruleset.Port, str | None] = field(default_factory=dict)  # → comment
    has_bridge_table: bool = False

    @property
    def from_bridge(self) -> dict[str, tuple[str | None, str | None]]:
        return self.maps.get(ruleset.FROM_BRIDGE, {})

    @property
    def to_host(self) -> dict[str, tuple[str | None, str | None]]:
        return self.maps.get(ruleset.TO_HOST, {})

    def tenant_ids(self) -> set[int]:
        """Net-ids with anything of theirs in the tables."""
        ids = {int(c[1:]) for c in self.chains if ruleset.TENANT_CHAIN_RE.fullmatch(c)}
        comments = [*self.subnets.values(), *self.ports.values()]
        for m in self.maps.values():
            comments += [c for _, c in m.values()]
        for comment in comments:
            n = ruleset.net_id_of_tag(comment)
            if n is not None:
                ids.add(n)
        return ids


def _port_net_id(comment: str | None) -> int:
    n = ruleset.net_id_of_tag(comment)
    return -1 if n is None else n


def _nft(doc: list[ruleset.Json]) -> None:
    proc.run(["nft", "-j", "-f", "-"], input=json.dumps({"nftables": doc}).encode(),
             timeout=NFT_TIMEOUT)


def list_tables() -> list[tuple[str, str]]:
    """(family, name) of every nftables table in this network namespace."""
    out = json.loads(proc.output(["nft", "-j", "list", "tables"], timeout=NFT_TIMEOUT))
    return [(o["table"]["family"], o["table"]["name"]) for o in out["nftables"] if "table" in o]


def _list(family: str, name: str) -> list[ruleset.Json] | None:
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


def _obj(kind: str, family: str, table: str, **body: Any) -> ruleset.Json:
    return {kind: {"family": family, "table": table, **body}}


def _refill(family: str, table: str, chain: str, rules: list[ruleset.Rule]) -> list[ruleset.Json]:
    doc = [{"add": _obj("chain", family, table, name=chain)},
           {"flush": _obj("chain", family, table, name=chain)}]
    doc += [{"add": _obj("rule", family, table, chain=chain, expr=list(r.expr),
                         comment=r.comment)} for r in rules]
    return doc


def _tagged(val: Any, comment: str | None) -> Any:
    return {"elem": {"val": val, "comment": comment}} if comment else val


def _port_val(p: ruleset.Port) -> ruleset.Json:
    return {"concat": [p.name, p.mac, str(p.ip)]}


# -- the two tables of one state home ----------------------------------------------------

def _chain_or_rule(obj: dict[str, Any], chains: dict[str, list[tuple[int, ruleset.Rule]]],
                   hooked: dict[str, bool]) -> bool:
    """Read a listed chain (whether it is a base chain) or rule into `chains`; False: neither."""
    if "chain" in obj:
        c = obj["chain"]
        chains.setdefault(c["name"], [])
        hooked[c["name"]] = "hook" in c
    elif "rule" in obj:
        r = obj["rule"]
        chains.setdefault(r["chain"], []).append((r["handle"], ruleset.Rule(r.get("comment", ""), tuple(r["expr"]))))
    else:
        return False
    return True


@dataclass(frozen=True)
class Tables:
    """The nftables tables of one state home (`inet <name>` and `bridge <name>`)."""

    name: str = ruleset.TABLE

    # -- reading

    def read(self) -> Installed | None:
        """The home's tables as installed, or None when there is no inet table."""
        objs = _list(ruleset.FAMILY, self.name)
        if objs is None:
            return None
        state = Installed()
        for obj in objs:
            if _chain_or_rule(obj, state.chains, state.base_chains_hooked):
                pass
            elif "set" in obj and obj["set"]["name"] in (ruleset.SUBNETS, ruleset.HOSTNETS):
                s = obj["set"]
                state.sets.add(s["name"])
                for item in s.get("elem", []):
                    val, comment = _elem(item)
                    net = _net(val)
                    if net is None:
                        continue
                    if s["name"] == ruleset.SUBNETS:
                        state.subnets[net] = comment
                    else:
                        state.hostnets.add(net)
            elif "map" in obj and obj["map"]["name"] in (ruleset.FROM_BRIDGE, ruleset.TO_HOST):
                mp = obj["map"]
                state.sets.add(mp["name"])
                entries = state.maps.setdefault(mp["name"], {})
                for key, verdict in mp.get("elem", []):
                    name, comment = _elem(key)
                    target = verdict.get("jump", {}).get("target") \
                        if isinstance(verdict, dict) else None
                    entries[str(name)] = (target, comment)
        for obj in _list(ruleset.BRIDGE_FAMILY, self.name) or []:
            if "table" in obj:
                state.has_bridge_table = True
            elif _chain_or_rule(obj, state.bridge_chains, state.bridge_hooked):
                pass
            elif "set" in obj and obj["set"]["name"] == ruleset.PORTS:
                state.sets.add(ruleset.PORTS)
                for item in obj["set"].get("elem", []):
                    val, comment = _elem(item)
                    parts = val.get("concat") if isinstance(val, dict) else None
                    if parts and len(parts) == 3:
                        state.ports[ruleset.Port.of(parts[0], parts[1], parts[2],
                                            _port_net_id(comment))] = comment
        return state

    def installed_tenants(self) -> dict[int, IPv4Network]:
        """Net-id → subnet of every tenant whose subnet is in the table."""
        state = self.read()
        if state is None:
            return {}
        out = {}
        for net, comment in state.subnets.items():
            n = ruleset.net_id_of_tag(comment)
            if n is not None:
                out[n] = net
        return out

    def exists(self) -> bool:
        return (ruleset.FAMILY, self.name) in list_tables()

    # -- writing

    def _base_doc(self, hostnets: Iterable[IPv4Network]) -> list[ruleset.Json]:
        f, n = ruleset.FAMILY, self.name
        doc: list[ruleset.Json] = [
            {"add": {"table": {"family": f, "name": n}}},
            {"add": _obj("set", f, n, name=ruleset.SUBNETS, type="ipv4_addr", flags=["interval"])},
            {"add": _obj("set", f, n, name=ruleset.HOSTNETS, type="ipv4_addr", flags=["interval"])},
            {"flush": _obj("set", f, n, name=ruleset.HOSTNETS)},
            {"add": _obj("map", f, n, name=ruleset.FROM_BRIDGE, type="ifname", map="verdict")},
            {"add": _obj("map", f, n, name=ruleset.TO_HOST, type="ifname", map="verdict")},
            {"add": _obj("chain", f, n, name=ruleset.TO_BRIDGE)},
            {"add": _obj("chain", f, n, name=ruleset.REFUSE)},
            {"add": _obj("chain", f, n, name=ruleset.CLOSED)},
            {"add": _obj("chain", f, n, name=ruleset.INPUT, type="filter", hook="input", prio=0,
                         policy="accept")},
            {"add": _obj("chain", f, n, name=ruleset.FORWARD, type="filter", hook="forward", prio=0,
                         policy="accept")},
            {"add": _obj("chain", f, n, name=ruleset.POSTROUTING, type="nat", hook="postrouting",
                         prio=100, policy="accept")},
        ]
        nets = [ruleset.prefix(h) for h in hostnets]
        if nets:
            doc.append({"add": _obj("element", f, n, name=ruleset.HOSTNETS, elem=nets)})
        for chain in (ruleset.REFUSE, ruleset.CLOSED, ruleset.TO_BRIDGE, ruleset.INPUT, ruleset.FORWARD,
                      ruleset.POSTROUTING):
            doc += _refill(f, n, chain, ruleset.base_rules()[chain])
        b = ruleset.BRIDGE_FAMILY
        doc += [
            {"add": {"table": {"family": b, "name": n}}},
            {"add": _obj("set", b, n, name=ruleset.PORTS, type=["ifname", "ether_addr", "ipv4_addr"])},
            {"add": _obj("chain", b, n, name=ruleset.FROM_PORT)},
            {"add": _obj("chain", b, n, name=ruleset.PREROUTING, type="filter", hook="prerouting",
                         prio=-200, policy="accept")},
        ]
        for chain in (ruleset.FROM_PORT, ruleset.PREROUTING):
            doc += _refill(b, n, chain, ruleset.bridge_rules()[chain])
        return doc

    def _tenant_doc(self, t: ruleset.TenantNet) -> list[ruleset.Json]:
        f, n = ruleset.FAMILY, self.name
        return [
            *_refill(f, n, t.chain, ruleset.tenant_rules(t)),
            *_refill(f, n, t.host_chain, ruleset.host_rules(t)),
            {"add": _obj("element", f, n, name=ruleset.FROM_BRIDGE,
                         elem=[[_tagged(t.bridge, t.tag), {"jump": {"target": t.chain}}]])},
            {"add": _obj("element", f, n, name=ruleset.TO_HOST,
                         elem=[[_tagged(t.bridge, t.tag), {"jump": {"target": t.host_chain}}]])},
            {"add": _obj("element", f, n, name=ruleset.SUBNETS, elem=[_tagged(ruleset.prefix(t.subnet), t.tag)])},
        ]

    def _removal_doc(self, state: Installed, keep: set[int], wanted: dict[int, ruleset.TenantNet],
                     ports: dict[str, ruleset.Port] | None = None) -> list[ruleset.Json]:
        """Delete whatever the tables hold that is not in `wanted` (or kept untouched).

        `ports` None leaves ports of wanted tenants alone; a dict removes those not in it.
        """
        f, n = ruleset.FAMILY, self.name
        doc: list[ruleset.Json] = []
        for mname, target_of in ((ruleset.FROM_BRIDGE, lambda t: t.chain),
                                 (ruleset.TO_HOST, lambda t: t.host_chain)):
            for bridge, (target, comment) in state.maps.get(mname, {}).items():
                nid = ruleset.net_id_of_tag(comment)
                if nid in keep:
                    continue
                t = wanted.get(nid) if nid is not None else None
                if t is None or t.bridge != bridge or target != target_of(t):
                    # delete by key alone: the element's verdict may point anywhere
                    doc.append({"delete": _obj("element", f, n, name=mname, elem=[bridge])})
        for net, comment in state.subnets.items():
            nid = ruleset.net_id_of_tag(comment)
            if nid in keep:
                continue
            t = wanted.get(nid) if nid is not None else None
            if t is None or t.subnet != net:
                doc.append({"delete": _obj("element", f, n, name=ruleset.SUBNETS, elem=[ruleset.prefix(net)])})
        for p, comment in state.ports.items():
            nid = ruleset.net_id_of_tag(comment)
            if nid in keep:
                continue
            if nid in wanted and (ports is None or ports.get(p.name) == p):
                continue
            doc.append({"delete": _obj("element", ruleset.BRIDGE_FAMILY, n, name=ruleset.PORTS,
                                       elem=[_port_val(p)])})
        for chain in state.chains:
            if chain in ruleset.BASE_CHAINS:
                continue
            m = ruleset.TENANT_CHAIN_RE.fullmatch(chain)
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

    def ensure_tenant(self, t: ruleset.TenantNet, hostnets: Iterable[IPv4Network] = ()) -> None:
        """Install the tenant's isolation, closed host and NAT (idempotent, one atomic nft
        transaction), and refresh the host's own networks in `hostnets`.

        Leftovers of the same net-id with another subnet or bridge are replaced; other
        tenants are not touched.
        """
        with self._locked():
            state = self.read()
            stale: list[ruleset.Json] = []
            if state is not None:
                for net, comment in state.subnets.items():
                    other = ruleset.net_id_of_tag(comment)
                    if other != t.net_id and net.overlaps(t.subnet):
                        who = f"net-id {other}" if other is not None else "an untagged entry"
                        raise Conflict(f"subnet {t.subnet} of net-id {t.net_id} overlaps {net} "
                                       f"of {who}", "tenant subnets must not overlap")
                stale = self._removal_doc(state, keep=state.tenant_ids() - {t.net_id},
                                          wanted={t.net_id: t})
            _nft(self._base_doc(ruleset.collapse(hostnets)) + stale + self._tenant_doc(t))

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

    def ensure_port(self, port: ruleset.Port) -> None:
        """Let `port` send frames from its MAC and IP only (idempotent; one nft call, no read:
        a port's name, MAC and IP are fixed for the life of its instance)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", port.name):
            raise ValueError(f"not an interface name: {port.name!r}")
        try:
            _nft([{"add": _obj("element", ruleset.BRIDGE_FAMILY, self.name, name=ruleset.PORTS,
                               elem=[_tagged(_port_val(port), ruleset.tag(port.net_id))])}])
        except CommandFailed as e:
            raise Conflict(f"cannot allow {port.name} in firewall table {self.name}: {e.stderr.strip()}",
                           "`mvm net verify --repair` restores the tables") from e

    def remove_port(self, name: str) -> bool:
        """Forget what `name` may send (its frames are then all dropped); True if it was known."""
        with self._locked():
            try:
                text = proc.output(["nft", "-j", "list", "set", ruleset.BRIDGE_FAMILY, self.name, ruleset.PORTS],
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
                        doc.append({"delete": _obj("element", ruleset.BRIDGE_FAMILY, self.name,
                                                   name=ruleset.PORTS, elem=[val])})
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
               for fam in (ruleset.FAMILY, ruleset.BRIDGE_FAMILY) if (fam, self.name) in have]
        if doc:
            _nft(doc)

    def sync(self, expected: Iterable[ruleset.TenantNet], hostnets: Iterable[IPv4Network] = (),
             ports: Iterable[ruleset.Port] | None = None) -> None:
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
            doc = self._base_doc(ruleset.collapse(hostnets))
            if state is not None:
                doc += self._removal_doc(state, keep=set(), wanted=wanted, ports=want_ports)
            for t in wanted.values():
                doc += self._tenant_doc(t)
            have = set(state.ports) if state is not None else set()
            for p in (want_ports or {}).values():
                if p.net_id in wanted and not any(
                        (h.name, h.mac, h.ip) == (p.name, p.mac, p.ip) for h in have):
                    doc.append({"add": _obj("element", ruleset.BRIDGE_FAMILY, self.name, name=ruleset.PORTS,
                                            elem=[_tagged(_port_val(p), ruleset.tag(p.net_id))])})
            _nft(doc)
