"""Tenant network plan: names, addresses and allocations (pure)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from mvm.errors import Conflict, InvalidInput, MvmError, QuotaExceeded
from mvm.network import plan


def test_names_fit_ifnamsiz_and_round_trip() -> None:
    assert plan.bridge_name(0) == "mvmbr0"
    assert plan.bridge_name(4095) == "mvmbr4095"
    assert plan.net_id_of_bridge("mvmbr4095") == 4095
    assert plan.tap_name("i-1a2b3c4d") == "mvt1a2b3c4d"
    assert len(plan.tap_name("i-ffffffff")) <= 15 and len(plan.bridge_name(4095)) <= 15
    assert plan.is_tap_name("mvt1a2b3c4d") and plan.is_bridge_name("mvmbr7")


@pytest.mark.parametrize("name", ["mvmbr", "mvmbr01", "mvmbr4096", "mvmbr-x", "mvmbr7a"])
def test_foreign_bridge_shapes_are_not_ours(name: str) -> None:
    assert not plan.is_bridge_name(name)


@pytest.mark.parametrize("name", ["mvt", "mvtap0", "mvt1A2B3C4D", "mvt1a2b3c4d0"])
def test_foreign_tap_shapes_are_not_ours(name: str) -> None:
    assert not plan.is_tap_name(name)


@pytest.mark.parametrize("bad", ["1a2b3c4d", "i-1A2B3C4D", "i-123", "i-1a2b3c4d/../x"])
def test_tap_name_refuses_invalid_instance_ids(bad: str) -> None:
    with pytest.raises(InvalidInput):
        plan.tap_name(bad)


def test_macs_are_deterministic_unique_and_locally_administered() -> None:
    macs = {plan.mac_for(n, i) for n in (0, 1, 255, 256, 4095) for i in range(1, 255)}
    assert len(macs) == 5 * 254
    # 02:6d:76 ("mv", locally administered), the 12-bit net-id in two octets, the host index:
    # the same (net-id, index) gets the same MAC on every host and after every restart.
    assert plan.mac_for(300, 7) == "02:6d:76:01:2c:07"
    assert plan.mac_for(0, 1) == "02:6d:76:00:00:01"  # a bridge's MAC
    assert plan.mac_for(4095, 254) == "02:6d:76:0f:ff:fe"
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0b10 and not first & 0b01  # locally administered, unicast


def test_addresses_within_the_tenant_subnet() -> None:
    net = IPv4Network("10.192.5.0/24")
    assert plan.gateway(net) == IPv4Address("10.192.5.1")
    assert plan.builder_ip("10.192.5.0/24") == IPv4Address("10.192.5.2")
    assert plan.ip_for(net, 3) == IPv4Address("10.192.5.3")
    assert len({plan.ip_for(net, i) for i in range(3, 255)}) == 252
    with pytest.raises(InvalidInput):
        plan.ip_for(net, 255)


def test_instance_net_and_kernel_arg() -> None:
    n = plan.instance_net(5, "10.192.5.0/24", "i-0000abcd", 3)
    assert (n.bridge, n.tap, str(n.ip), str(n.gateway)) == \
        ("mvmbr5", "mvt0000abcd", "10.192.5.3", "10.192.5.1")
    assert n.kernel_arg("i-0000abcd") == \
        "ip=10.192.5.3::10.192.5.1:255.255.255.0:i-0000abcd:eth0:off"
    assert plan.kernel_ip_arg("10.0.0.3", "10.0.0.1", "255.255.255.0", "web") == \
        "ip=10.0.0.3::10.0.0.1:255.255.255.0:web:eth0:off"
    with pytest.raises(InvalidInput):
        plan.kernel_ip_arg("10.0.0.3", "10.0.0.1", "255.255.255.0", "a:b")


def test_host_index_lowest_free_and_full_error() -> None:
    assert plan.allocate_host_index(set()) == 3
    assert plan.allocate_host_index({3, 4, 6}) == 5
    assert plan.allocate_host_index({1, 2}) == 3
    with pytest.raises(QuotaExceeded) as e:
        plan.allocate_host_index(set(range(3, 255)))
    assert "full" in e.value.line() and "\n" not in e.value.line()


def test_net_id_allocation_and_validation() -> None:
    assert plan.allocate_net_id([]) == 0
    assert plan.allocate_net_id([0, 1, 3]) == 2
    with pytest.raises(QuotaExceeded):
        plan.allocate_net_id(range(4096))
    assert plan.validate_net_id(4095, [1]) == 4095
    for bad in (-1, 4096, True, "3"):
        with pytest.raises(InvalidInput):
            plan.validate_net_id(bad)
    with pytest.raises(Conflict):
        plan.validate_net_id(7, {7})
    with pytest.raises(InvalidInput):
        plan.bridge_name(4096)


def test_default_subnets_cover_every_net_id_without_overlap() -> None:
    subnets = {plan.default_subnet(n) for n in range(4096)}
    assert len(subnets) == 4096
    assert all(s.subnet_of(plan.SUBNET_POOL) and s.prefixlen == 24 for s in subnets)
    assert plan.default_subnet(0) == IPv4Network("10.192.0.0/24")
    assert plan.default_subnet(4095) == IPv4Network("10.207.255.0/24")


def test_allocate_subnet_avoids_custom_subnets() -> None:
    assert plan.allocate_subnet([], 7) == IPv4Network("10.192.7.0/24")
    # someone brought 10.192.7.0/24 and 10.192.0.0/24 themselves: take the lowest free
    got = plan.allocate_subnet(["10.192.7.0/24", "10.192.0.0/24"], 7)
    assert got == IPv4Network("10.192.1.0/24")
    with pytest.raises(QuotaExceeded):
        plan.allocate_subnet([plan.SUBNET_POOL], 0)


def test_validate_subnet() -> None:
    assert plan.validate_subnet("172.16.9.0/24", ["10.192.0.0/24"]) == \
        IPv4Network("172.16.9.0/24")
    cases: list[tuple[object, type[MvmError], str]] = [
        ("nonsense", InvalidInput, "invalid subnet"),
        ("10.1.2.0/16", InvalidInput, "host bits"),  # host bits checked before size
        ("10.1.0.0/16", InvalidInput, "not a /24"),
        ("10.1.2.5/24", InvalidInput, "did you mean 10.1.2.0/24"),
        ("8.8.8.0/24", InvalidInput, "not private"),
    ]
    for cidr, kind, text in cases:
        with pytest.raises(kind) as e:
            plan.validate_subnet(cidr)
        assert text in e.value.line()
    with pytest.raises(Conflict) as c:
        plan.validate_subnet("10.192.5.0/24", {"acme": "10.192.0.0/16"})
    assert "tenant acme" in c.value.line()
    with pytest.raises(Conflict):
        plan.validate_subnet("10.192.5.0/24", [IPv4Network("10.192.5.0/24")])
