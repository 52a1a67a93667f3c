"""The firewall (moved; see nft.py)."""

from mvm.network.firewall.nft import Firewall, Port, TenantNet, host_rules, list_tables, parse_egress, tenant_rules

__all__ = ["Firewall", "Port", "TenantNet", "host_rules", "list_tables", "parse_egress", "tenant_rules"]
