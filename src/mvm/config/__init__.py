"""Typed settings (`settings`) and the host context every operation runs in (`host.Host`)."""

from mvm.config.settings import SETTINGS, Setting, get, load, set_value

__all__ = ["SETTINGS", "Setting", "get", "load", "set_value"]
