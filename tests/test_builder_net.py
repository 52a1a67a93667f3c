"""The builder microVM's egress-only network (issue 8): a URL ref only the builder fetches.

The test's namespace plays the host; an uplink veth leads to an `out` namespace that plays
the internet (203.0.113.5, where `python3 -m http.server` serves a flake as a tarball). Never
real internet. Nix 2.8 takes a tarball flake as `http://…/x.tar.gz` (with one top directory);
it refuses `tarball+http:`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from mvm.lifecycle import netops
from mvm.network import plan
from tests.conftest import Mvm, needs_assets
from tests.test_builder_vm import _leftovers

OUTSIDE = "203.0.113.5"


def test_builder_names_and_dns_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert plan.builder_tap_name(0) == "mvb000" and plan.builder_tap_name(4095) == "mvbfff"
    assert plan.is_tap_name("mvbfff") and not plan.is_tap_name("mvb1000")
    assert not plan.TAP_RE.fullmatch("mvb000")  # never an instance's TAP
    t = type("T", (), {"net_id": 7, "subnet": "10.192.7.0/24"})()
    net = netops.builder_net(t)  # type: ignore[arg-type]
    assert (str(net.ip), net.host_index, net.mac) == ("10.192.7.2", plan.BUILDER_INDEX,
                                                      plan.mac_for(7, 2))
    assert plan.allocate_host_index(set()) == 3  # instances never take the builder's .2
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver 192.168.1.1\nnameserver fe80::1\n"
                    "nameserver 169.254.1.1\nnameserver 9.9.9.9\nnameserver 1.1.1.1\n")
    monkeypatch.setattr(netops, "RESOLV_CONFS", (conf,))
    # host-local (loopback, link-local, a host network such as a LAN router): refused by the
    # closed host, so not given
    assert netops.builder_dns([IPv4Network("192.168.1.0/24")]) == ["9.9.9.9", "1.1.1.1"]
    conf.write_text("nameserver 127.0.0.53\n")
    assert netops.builder_dns([]) == []


def _in(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], check=True)


@pytest.mark.net
@pytest.mark.guest
@pytest.mark.nix
@needs_assets("kernel", "nixpkgs-offline", "builder")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_url_flake_fetched_only_by_the_builder_through_its_tenant_network(
        gmvm: Mvm, flake_copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ns = gmvm.ns
    assert ns
    out = f"{ns}-out"
    subprocess.run(["ip", "netns", "add", out], check=True)
    server = None
    try:
        # the uplink: a LAN to `out`, which holds the "internet" beyond the default route
        for argv in (["ip", "link", "add", "vout", "type", "veth", "peer", "name", "voutp"],
                     ["ip", "link", "set", "voutp", "netns", out],
                     ["ip", "addr", "add", "192.168.77.1/24", "dev", "vout"],
                     ["ip", "link", "set", "vout", "up"],
                     ["ip", "route", "add", "default", "via", "192.168.77.2"]):
            _in(ns, *argv)
        for argv in (["ip", "addr", "add", "192.168.77.2/24", "dev", "voutp"],
                     ["ip", "link", "set", "voutp", "up"], ["ip", "link", "set", "lo", "up"],
                     ["ip", "addr", "add", f"{OUTSIDE}/32", "dev", "lo"]):
            _in(out, *argv)
        flake = flake_copy("guide-flake")
        www = tmp_path / "www"
        www.mkdir()
        with tarfile.open(www / "flake.tar.gz", "w:gz") as tar:
            tar.add(flake, arcname="flake")  # one top directory, as Nix expects
        server = subprocess.Popen(
            ["ip", "netns", "exec", out, sys.executable, "-m", "http.server", "80",
             "--bind", OUTSIDE, "--directory", str(www)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://{OUTSIDE}/flake.tar.gz"

        gmvm.ok("tenant", "create", "acme")
        gmvm.ok("pool", "create", "acme/local", "--flake", str(flake), "--profile", "minimal",
                "--network", "none")
        gmvm.ok("pool", "create", "acme/url", "--flake", url, "--profile", "minimal",
                "--network", "none")
        # a builder TAP a killed command left (no builder holds it): the next build removes it
        tenant = json.loads(gmvm.ok("tenant", "info", "acme", "--json").out)
        stale = plan.builder_tap_name(tenant["net_id"])
        _in(ns, "ip", "tuntap", "add", stale, "mode", "tap")
        # a local flake: the builder has no network device at all (what the guest sees)
        r = gmvm.ok("pool", "build", "acme/local", "--builder", "vm")
        assert "network: none (devices: lo)" in r.err, r.err
        links = subprocess.run(["ip", "netns", "exec", ns, "ip", "-o", "link"], text=True,
                               capture_output=True, check=True).stdout
        assert stale not in links, links
        local_rev = r.out.split("revision ")[1].split()[0]
        # the URL ref: fetched by the builder through the tenant's network, same revision
        r = gmvm.ok("pool", "build", "acme/url", "--builder", "vm")
        subnet = tenant["subnet"]
        gw = str(plan.gateway(subnet))
        assert f"network: {plan.builder_ip(subnet)}/24 via {gw}" in r.err, r.err
        assert "fetch: /nix/store/" in r.err, r.err
        assert r.out.split("revision ")[1].split()[0] == local_rev, (r.out, local_rev)
        manifest = json.loads((gmvm.home / "tenants/acme/pools/url/artifacts/current/"
                               "manifest.json").read_text())
        assert manifest["fetched"]["ref"] == url and manifest["builder"]["kind"] == "vm"
        # nothing left: no TAP, no tenant bridge (the tenant has no instances), no builder
        links = subprocess.run(["ip", "netns", "exec", ns, "ip", "-o", "link"], text=True,
                               capture_output=True, check=True).stdout
        assert "mvb" not in links and "mvmbr" not in links, links
        assert _leftovers(gmvm, "acme", "url") == [] and _leftovers(gmvm, "acme", "local") == []
        # without the offline package set, a local flake's builder fetches the flake's own
        # nixpkgs through its network too (there is no outside DNS here: Nix's own error),
        # and its TAP goes all the same
        cfg = gmvm.home / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "nixpkgs": ""}))
        r = gmvm("pool", "build", "acme/local", "--builder", "vm")
        assert r.rc == 7 and f"network: {plan.builder_ip(subnet)}/24" in r.err, r.err
        assert "no offline package set" in r.err and "github" in r.err, r.err
        links = subprocess.run(["ip", "netns", "exec", ns, "ip", "-o", "link"], text=True,
                               capture_output=True, check=True).stdout
        assert "mvb" not in links and "mvmbr" not in links, links
        assert _leftovers(gmvm, "acme", "local") == []
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", out], check=False)
    assert server is not None and server.stderr is not None
    served = server.stderr.read()
    assert "GET /flake.tar.gz HTTP/1.1\" 200" in served and "192.168.77.1" in served, served
    assert shutil.which("ip")
