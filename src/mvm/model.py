"""The object model (DESIGN §1, §2): IDs, records, and the instance state machine."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from enum import StrEnum

from mvm.errors import IllegalTransition, InvalidInput

_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8}")
_REV = re.compile(r"[0-9a-f]{6,64}")

ID_RULE = "lowercase letters, digits and '-', 1-63 characters, not starting or ending with '-'"


def check_id(kind: str, value: str) -> str:
    """Validate a tenant or pool ID before it is ever used as a path component."""
    if not _ID.fullmatch(value):
        raise InvalidInput(f"invalid {kind} ID {value!r}", f"use {ID_RULE}")
    return value


def check_instance_id(value: str) -> str:
    if not _INSTANCE_ID.fullmatch(value):
        raise InvalidInput(f"invalid instance ID {value!r}", "instance IDs look like i-1a2b3c4d")
    return value


def check_revision(value: str) -> str:
    if not _REV.fullmatch(value):
        raise InvalidInput(f"invalid revision {value!r}", "a revision is a hex hash, see `mvm pool revisions`")
    return value


def new_instance_id() -> str:
    return "i-" + secrets.token_hex(4)


@dataclass(frozen=True)
class PoolRef:
    tenant: str
    pool: str

    @classmethod
    def parse(cls, text: str) -> PoolRef:
        parts = text.split("/")
        if len(parts) != 2:
            raise InvalidInput(f"invalid pool address {text!r}", "write it as <tenant>/<pool>, e.g. acme/workers")
        return cls(check_id("tenant", parts[0]), check_id("pool", parts[1]))

    def __str__(self) -> str:
        return f"{self.tenant}/{self.pool}"


@dataclass(frozen=True)
class InstanceRef:
    tenant: str
    pool: str
    instance: str

    @classmethod
    def parse(cls, text: str) -> InstanceRef:
        parts = text.split("/")
        if len(parts) != 3:
            raise InvalidInput(
                f"invalid instance address {text!r}",
                "write it as <tenant>/<pool>/<instance>, e.g. acme/workers/i-1a2b3c4d",
            )
        return cls(check_id("tenant", parts[0]), check_id("pool", parts[1]), check_instance_id(parts[2]))

    @property
    def pool_ref(self) -> PoolRef:
        return PoolRef(self.tenant, self.pool)

    def __str__(self) -> str:
        return f"{self.tenant}/{self.pool}/{self.instance}"


@dataclass(frozen=True)
class Quotas:
    max_vcpus: int = 16
    max_mem: int = 32768
    max_running: int = 8
    max_warm: int = 4
    max_pools: int = 16
    max_instances: int = 32
    max_data_disk: int = 16384  # MiB of data disk per instance
    max_disk: int = 65536  # MiB of data disks of all the tenant's instances and of its pools' builds


@dataclass(frozen=True)
class Tenant:
    id: str
    net_id: int
    subnet: str
    quotas: Quotas = field(default_factory=Quotas)
    secrets_version: int = 0
    created: float = 0.0
    #: Egress lists (IPv4 CIDRs): with an allow list a guest reaches only those outside
    #: networks; the deny list is refused even where allowed.
    egress_allow: tuple[str, ...] = ()
    egress_deny: tuple[str, ...] = ()


MIN_MEM_MIB = 128
MAX_CPUS = 32
MAX_MEM_MIB = 65536


@dataclass(frozen=True)
class Pool:
    tenant: str
    id: str
    flake: str
    profile: str
    cpus: int
    mem: int
    data_disk: int = 0
    network: str = "tenant"
    current: str | None = None
    desired_running: int = 0
    desired_warm: int = 0
    desired_sleeping: int = 0
    created: float = 0.0
    #: Idle policy (the agent): seconds idle before a running instance goes warm, and before
    #: a warm one goes to sleep (None: never); at least `min_running` stay running; a pinned
    #: pool's instances are never moved by the policy.
    idle_warm: float | None = None
    idle_sleep: float | None = None
    min_running: int = 0
    pinned: bool = False
    #: The hypervisor backend its instances and builder run on ("qemu", "firecracker");
    #: recorded at create (the host's setting `backend` when none is asked for); "": the host's
    #: (pools made before backends were per pool).
    backend: str = ""
    #: "<device>:<inode>" of the local flake directory (or git repository) at `pool create`:
    #: a build refuses another directory in its place; "" for a URL ref (and, until their next
    #: build records it, pools made before it was recorded).
    flake_id: str = ""
    #: MiB of host disk the pool's builds hold (its builder's store and its revisions, in
    #: allocated blocks), as measured at its last build or gc: part of the tenant's max-disk.
    build_disk: int = 0
    #: Seconds a hypervisor may go on not answering its control socket once observed so
    #: (`unresponsive`) before it is ended and its instance failed, to be started again.
    unresponsive_grace: float = 30.0

    @property
    def ref(self) -> PoolRef:
        return PoolRef(self.tenant, self.id)

    @property
    def has_idle_policy(self) -> bool:
        return not self.pinned and (self.idle_warm is not None or self.idle_sleep is not None)


@dataclass(frozen=True)
class Revision:
    tenant: str
    pool: str
    hash: str
    out_path: str
    manifest: dict[str, object]
    created: float


class State(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    WARM = "warm"
    SLEEPING = "sleeping"
    STOPPED = "stopped"
    FAILED = "failed"
    DESTROYED = "destroyed"

    def is_live(self) -> bool:
        """A hypervisor process exists for the instance."""
        return self in (State.RUNNING, State.WARM)



class Action(StrEnum):
    START = "start"
    WARM = "warm"
    RESUME = "resume"
    SLEEP = "sleep"
    WAKE = "wake"
    STOP = "stop"
    DESTROY = "destroy"


# The one transition table: action -> (states it may start from, state it ends in).
TRANSITIONS: dict[Action, tuple[frozenset[State], State]] = {
    Action.START: (frozenset({State.CREATED, State.STOPPED, State.FAILED}), State.RUNNING),
    Action.WARM: (frozenset({State.RUNNING}), State.WARM),
    Action.RESUME: (frozenset({State.WARM}), State.RUNNING),
    Action.SLEEP: (frozenset({State.RUNNING, State.WARM}), State.SLEEPING),
    Action.WAKE: (frozenset({State.SLEEPING}), State.RUNNING),
    # (stopping a stopped instance is allowed: it makes sure nothing of it runs)
    Action.STOP: (
        frozenset({State.RUNNING, State.WARM, State.SLEEPING, State.FAILED, State.CREATED, State.STOPPED}),
        State.STOPPED,
    ),
    Action.DESTROY: (frozenset(set(State) - {State.DESTROYED}), State.DESTROYED),
}


def transition(current: State, action: Action, what: str = "instance") -> State:
    """The one guard: the state `action` leads to from `current`, or IllegalTransition."""
    allowed, target = TRANSITIONS[action]
    if current not in allowed:
        froms = ", ".join(sorted(s.value for s in allowed))
        raise IllegalTransition(
            f"cannot {action.value} {what}: it is {current.value}",
            f"{action.value} works from: {froms}",
        )
    return target


class Reason(StrEnum):
    """Why a change happened: every event carries one."""

    USER = "user"  # a person's command
    SCALE = "scale"  # `pool scale` converging a pool
    POLICY = "policy"  # an idle or admission policy
    CRASH = "crash"  # recovery from a crashed command or hypervisor
    QUOTA = "quota"  # a quota refused or limited a change
    BUILD = "build"  # a pool build
    SECRETS = "secrets"  # secrets re-delivery
    ADMISSION = "admission"  # the host's memory refused a start or wake (lifecycle/admission.py)
    WORK = "work"  # work arriving (an exec through the agent's API) brought an instance back


@dataclass(frozen=True)
class Event:
    """One typed event, written in the same transaction as the change it describes."""

    kind: str  # e.g. instance.start, instance.recovered
    message: str
    reason: Reason = Reason.USER
    tenant: str | None = None
    pool: str | None = None
    instance: str | None = None
    #: What caused it, when that is not the command itself: the error of a failure or
    #: refusal, the hypervisor's exit, a measurement.
    cause: str | None = None
    #: Seconds the transition or build it ends took (None for anything else).
    duration: float | None = None


@dataclass(frozen=True)
class Op:
    """A transition in flight, persisted before it acts: the action, the state it leads to,
    the steps completed so far, step data (e.g. the snapshot's name) and who runs it. A
    command that dies leaves it behind; the next one to take the pool's lock finds it and
    resumes or rolls back (lifecycle.recover)."""

    action: Action
    target: State
    source: State
    steps: tuple[str, ...] = ()
    data: dict[str, str] = field(default_factory=dict)
    owner: str = ""
    started: float = 0.0

    def done(self, step: str) -> bool:
        return step in self.steps


@dataclass(frozen=True)
class Instance:
    id: str
    tenant: str
    pool: str
    state: State
    revision: str | None
    host_index: int | None = None
    ip: str | None = None
    mac: str | None = None
    secrets_version: int = 0
    pid: int | None = None
    created: float = 0.0
    updated: float = 0.0
    error: str | None = None
    op: Op | None = None  # a transition in flight (or left by a command that died)
    snapshot: str | None = None  # the committed snapshot a wake may restore, exactly once
    #: Since when (wall clock) its live hypervisor has not answered its control socket, and
    #: what the last probe said; None while it answers (cleared with every change of state).
    unresponsive_since: float | None = None
    unresponsive_cause: str | None = None

    @property
    def ref(self) -> InstanceRef:
        return InstanceRef(self.tenant, self.pool, self.id)
