"""Drift: the installed tables compared with what the tenants (and their ports) need, rule by
rule (`Firewall.check`); `mvm net verify` reports it, `--repair` syncs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from mvm.network.firewall import rules as ruleset
from mvm.network.firewall.nft import Tables


@dataclass(frozen=True)
class Firewall(Tables):
    """The nftables tables of one state home, and their drift from what tenants need."""

    def check(self, expected: Iterable[ruleset.TenantNet], hostnets: Iterable[IPv4Network] = (),
              ports: Iterable[ruleset.Port] | None = None) -> Drift:
        """Compare the installed tables with what these tenants (and ports) need, rule by rule.

        `ports` None skips comparing the ports set.
        """
        wanted = {t.net_id: t for t in expected}
        drift = Drift()
        state = self.read()
        if state is None:
            if wanted:  # no tenants need no table
                drift.missing.append(f"nftables table {ruleset.FAMILY} {self.name}")
            return drift
        for s in (ruleset.SUBNETS, ruleset.HOSTNETS, ruleset.FROM_BRIDGE, ruleset.TO_HOST):
            if s not in state.sets:
                drift.missing.append(f"set {s}")
        want_chains: dict[str, list[ruleset.Rule]] = dict(ruleset.base_rules())
        for t in wanted.values():
            want_chains[t.chain] = ruleset.tenant_rules(t)
            want_chains[t.host_chain] = ruleset.host_rules(t)
        _compare(drift, state.chains, state.base_chains_hooked, want_chains, ruleset.HOOKED, "")
        if not state.has_bridge_table:
            drift.missing.append(f"nftables table {ruleset.BRIDGE_FAMILY} {self.name}")
        else:
            if ruleset.PORTS not in state.sets:
                drift.missing.append(f"set {ruleset.PORTS}")
            _compare(drift, state.bridge_chains, state.bridge_hooked, ruleset.bridge_rules(),
                     (ruleset.PREROUTING,), "bridge ")
        want_hostnets = set(ruleset.collapse(hostnets))
        if state.hostnets != want_hostnets:
            drift.missing += [f"host network {n} in set {ruleset.HOSTNETS}"
                              for n in sorted(want_hostnets - state.hostnets)]
            drift.extra += [f"host network {n} in set {ruleset.HOSTNETS}"
                            for n in sorted(state.hostnets - want_hostnets)]
        for t in wanted.values():
            if state.subnets.get(t.subnet, "") != t.tag:
                drift.missing.append(f"subnet {t.subnet} of net-id {t.net_id} in set {ruleset.SUBNETS}")
            if state.from_bridge.get(t.bridge) != (t.chain, t.tag):
                drift.missing.append(f"{t.bridge} → jump {t.chain} in map {ruleset.FROM_BRIDGE}")
            if state.to_host.get(t.bridge) != (t.host_chain, t.tag):
                drift.missing.append(f"{t.bridge} → jump {t.host_chain} in map {ruleset.TO_HOST}")
        for net, comment in state.subnets.items():
            nid = ruleset.net_id_of_tag(comment)
            if nid not in wanted or wanted[nid].subnet != net:
                drift.extra.append(f"subnet {net} in set {ruleset.SUBNETS}")
        for mname, target_of in ((ruleset.FROM_BRIDGE, lambda t: t.chain),
                                 (ruleset.TO_HOST, lambda t: t.host_chain)):
            for bridge, (target, comment) in state.maps.get(mname, {}).items():
                nid = ruleset.net_id_of_tag(comment)
                if nid not in wanted or wanted[nid].bridge != bridge \
                        or target != target_of(wanted[nid]):
                    drift.extra.append(f"{bridge} in map {mname}")
        if ports is not None:
            want_ports = {p: ruleset.tag(p.net_id) for p in ports}
            have_ports = {p: c for p, c in state.ports.items()}
            have_keys = {(p.name, p.mac, p.ip) for p in have_ports}
            for p in want_ports:
                if (p.name, p.mac, p.ip) not in have_keys:
                    drift.missing.append(f"port {p.name} ({p.mac}, {p.ip}) in set {ruleset.PORTS}")
            want_keys = {(p.name, p.mac, p.ip) for p in want_ports}
            for p in have_ports:
                if (p.name, p.mac, p.ip) not in want_keys:
                    drift.extra.append(f"port {p.name} ({p.mac}, {p.ip}) in set {ruleset.PORTS}")
        return drift


def _compare(drift: Drift, have_chains: dict[str, list[tuple[int, ruleset.Rule]]],
             hooked: dict[str, bool], want_chains: dict[str, list[ruleset.Rule]],
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
