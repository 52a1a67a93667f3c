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

The parts: rules.py, the rules themselves (pure); nft.py, the tables read back from nft and
changed in one transaction each; drift.py, what `check()` finds missing or extra.
"""

from mvm.network.firewall.drift import Drift, Firewall
from mvm.network.firewall.nft import Installed, Tables, list_tables
from mvm.network.firewall.rules import (
    Port,
    Rule,
    TenantNet,
    base_rules,
    bridge_rules,
    collapse,
    host_rules,
    parse_egress,
    tag,
    tenant_rules,
)

__all__ = ["Drift", "Firewall", "Installed", "Port", "Rule", "Tables", "TenantNet", "base_rules", "bridge_rules",
           "collapse", "host_rules", "list_tables", "parse_egress", "tag", "tenant_rules"]
