"""The host context every operation runs in (`host.Host`), above the store and the runtime it
holds and below the lifecycle that takes it; and its composition from this process's
environment, once, at the edge (`compose.compose`)."""

from mvm.context.host import Host, StepHook

__all__ = ["Host", "StepHook"]
