"""Compare the host's network with what the database says, and put mvm's part right.

Only links with mvm's exact name shapes and kinds, and mvm's own nftables table, are
looked at or changed; a foreign link that happens to carry an mvm name is reported and
left alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network

from mvm.network import firewall, host, plan


@dataclass
class Report:
    missing_bridges: list[str] = field(default_factory=list)
    extra_bridges: list[str] = field(default_factory=list)
    broken_bridges: list[str] = field(default_factory=list)  # "name: what is wrong"
    missing_taps: list[str] = field(default_factory=list)
    extra_taps: list[str] = field(default_factory=list)
    broken_taps: list[str] = field(default_factory=list)
    missing_rules: list[str] = field(default_factory=list)
    extra_rules: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # mvm-shaped names mvm does not own
    forwarding_off: bool = False
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No drift (foreign links are reported but are not mvm's to fix)."""
        return not (self.missing_bridges or self.extra_bridges or self.broken_bridges
                    or self.missing_taps or self.extra_taps or self.broken_taps
                    or self.missing_rules or self.extra_rules or self.forwarding_off)

    def lines(self) -> list[str]:
        out = [f"missing bridge {n}" for n in self.missing_bridges]
        out += [f"extra bridge {n}" for n in self.extra_bridges]
        out += [f"bridge {n}" for n in self.broken_bridges]
        out += [f"missing TAP {n}" for n in self.missing_taps]
        out += [f"extra TAP {n}" for n in self.extra_taps]
        out += [f"TAP {n}" for n in self.broken_taps]
        out += [f"missing {r}" for r in self.missing_rules]
        out += [f"extra {r}" for r in self.extra_rules]
        out += [f"not mvm's, left alone: {n}" for n in self.foreign]
        if self.forwarding_off:
            out.append("IPv4 forwarding is off")
        out += [f"repaired: {r}" for r in self.repaired]
        return out


def verify(expected_tenants: Iterable[firewall.TenantNet | tuple[int, str | IPv4Network]],
           expected_taps: Iterable[tuple[str, str]], repair: bool = False,
           fw: firewall.Firewall | None = None,
           ports: Iterable[firewall.Port] | None = None) -> Report:
    """Report drift between the host and the expected tenants/TAPs; repair it if asked.

    `expected_tenants` is a TenantNet (or (net-id, subnet)) per tenant, `expected_taps`
    (tap, bridge) per instance that should be plugged in, `ports` what each TAP may send
    (None: not compared). With `repair`, missing or misconfigured bridges, TAPs and rules
    are put back and extra ones removed. A TAP re-created under a running hypervisor does
    not reconnect it: that instance needs a restart.
    """
    fw = fw or firewall.Firewall()
    tenants = {t.net_id: t for t in (
        e if isinstance(e, firewall.TenantNet) else firewall.TenantNet.of(*e)
        for e in expected_tenants)}
    port_list = list(ports) if ports is not None else None
    taps = dict(expected_taps)
    report = Report()
    links = host.links()

    bridges = {t.bridge: t for t in tenants.values()}
    report.foreign = [f"{n} ({link.kind or 'plain link'})" for n, link in sorted(links.items())
                      if not _ours(n, link)]
    for name, t in sorted(bridges.items()):
        link = links.get(name)
        if link is None:
            report.missing_bridges.append(name)
        elif link.kind == "bridge":
            problem = _bridge_problem(link, t)
            if problem:
                report.broken_bridges.append(f"{name}: {problem}")
    report.extra_bridges = sorted(n for n, link in links.items() if plan.is_bridge_name(n)
                                  and link.kind == "bridge" and n not in bridges)
    for name, bridge in sorted(taps.items()):
        link = links.get(name)
        if link is None:
            report.missing_taps.append(name)
        elif link.tap:
            if link.master != bridge:
                report.broken_taps.append(f"{name}: attached to {link.master or 'nothing'}, "
                                          f"not {bridge}")
            elif not link.up:
                report.broken_taps.append(f"{name}: down")
            elif not host.ipv6_disabled(name):
                report.broken_taps.append(f"{name}: IPv6 is on")
    report.extra_taps = sorted(n for n, link in links.items() if plan.is_tap_name(n)
                               and link.tap and n not in taps)

    hostnets = host.host_networks()
    drift = fw.check(tenants.values(), hostnets, port_list)
    report.missing_rules, report.extra_rules = drift.missing, drift.extra
    report.forwarding_off = bool(tenants) and not host.forwarding_enabled()

    if repair:
        _repair(report, fw, tenants, taps, bool(drift), hostnets, port_list)
    return report


def _ours(name: str, link: host.Link) -> bool:
    return link.kind == "bridge" if plan.is_bridge_name(name) else link.tap


def _bridge_problem(link: host.Link, t: firewall.TenantNet) -> str | None:
    gw = IPv4Interface(f"{plan.gateway(t.subnet)}/24")
    if gw not in link.addresses:
        return f"lacks gateway address {gw}"
    if set(link.addresses) - {gw}:
        return "has addresses other than " + str(gw)
    if not link.up:
        return "down"
    if link.mac != plan.mac_for(t.net_id, plan.GATEWAY_INDEX):
        return f"MAC {link.mac} is not mvm's"
    if not host.ipv6_disabled(link.name):
        return "IPv6 is on"
    return None


def _repair(report: Report, fw: firewall.Firewall, tenants: dict[int, firewall.TenantNet],
            taps: dict[str, str], firewall_drift: bool, hostnets: list[IPv4Network],
            ports: list[firewall.Port] | None) -> None:
    done = report.repaired
    if report.forwarding_off:
        host.enable_forwarding()
        done.append("IPv4 forwarding enabled")
    broken = {entry.split(":", 1)[0] for entry in report.broken_bridges}
    for t in tenants.values():
        if t.bridge in report.missing_bridges or t.bridge in broken:
            host.ensure_bridge(t.net_id, t.subnet)
            done.append(f"bridge {t.bridge} set up")
    for name in report.extra_taps:
        host.remove_tap(name)
        done.append(f"TAP {name} removed")
    for name in report.extra_bridges:
        n = plan.net_id_of_bridge(name)
        if n is not None:
            host.remove_bridge(n)
            done.append(f"bridge {name} removed")
    broken_taps = {entry.split(":", 1)[0] for entry in report.broken_taps}
    for name, bridge in taps.items():
        if name in report.missing_taps or name in broken_taps:
            host.ensure_tap(name, bridge)
            done.append(f"TAP {name} set up on {bridge}")
    if firewall_drift:
        fw.sync(tenants.values(), hostnets, ports)
        done.append("firewall rules synced")
    if not tenants and fw.remove_all_if_empty():
        done.append("empty nftables table removed")
