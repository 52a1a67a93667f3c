"""mvm: fleets of microVMs for many tenants, built from Nix flakes."""

__version__ = "0.1.0"
