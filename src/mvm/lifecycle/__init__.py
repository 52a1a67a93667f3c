"""The instance lifecycle: one entry point (`apply`), each action's steps and recovery
(`effects`), explicit observation (`observe`), and where an instance's files live (`specs`).
See docs/ARCHITECTURE.md for the life of a transition."""

from mvm.lifecycle.apply import apply
from mvm.lifecycle.create import create
from mvm.lifecycle.effects import recover

__all__ = ["apply", "create", "recover"]
