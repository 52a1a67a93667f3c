"""The API's request and response bodies. Responses have the shapes `services.views` makes
(what the CLI prints with `--json`); tenants and pools are the model's own records."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from mvm.model import Pool, Quotas, State

#: No control characters (a path or a flake reference never has one).
TEXT = r"^[^\x00-\x1f\x7f]*$"
BIG = 2**31 - 1


class ErrorOut(BaseModel):
    """Every refusal: the one line the CLI would print, and what to do about it."""

    error: str
    hint: str | None = None
    #: The error's class (errors.py): NotFound, InvalidInput, QuotaExceeded, …
    kind: str = "MvmError"
    #: The exit code the CLI gives this error.
    exit_code: int = 1
    #: An exec's: whether its command started (true: it ran, or runs still, and its result
    #: was lost; exit_code 126), or not (exit_code 125). Other requests: absent.
    started: bool | None = None


class Done(BaseModel):
    message: str


class QuotasIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # (negative ones: refused by the service, with its own message)
    max_vcpus: int = Field(default=Quotas.max_vcpus, ge=-BIG, le=BIG)
    max_mem: int = Field(default=Quotas.max_mem, ge=-BIG, le=BIG)
    max_running: int = Field(default=Quotas.max_running, ge=-BIG, le=BIG)
    max_warm: int = Field(default=Quotas.max_warm, ge=-BIG, le=BIG)
    max_pools: int = Field(default=Quotas.max_pools, ge=-BIG, le=BIG)
    max_instances: int = Field(default=Quotas.max_instances, ge=-BIG, le=BIG)
    max_data_disk: int = Field(default=Quotas.max_data_disk, ge=-BIG, le=BIG)
    max_disk: int = Field(default=Quotas.max_disk, ge=-BIG, le=BIG)


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=63, pattern=TEXT)
    net_id: int | None = Field(default=None, ge=-BIG, le=BIG)
    subnet: str | None = Field(default=None, max_length=64, pattern=TEXT)
    quotas: QuotasIn = Field(default_factory=lambda: QuotasIn())
    egress_allow: list[str] = Field(default_factory=list, max_length=256)
    egress_deny: list[str] = Field(default_factory=list, max_length=256)


class EgressOut(BaseModel):
    allow: list[str]
    deny: list[str]


class TenantInfo(BaseModel):
    """`mvm tenant info`: in the order the CLI prints it."""

    id: str
    net_id: int
    subnet: str
    egress: EgressOut
    quotas: Quotas
    disk_used: int  # MiB of max-disk in use (data disks and builds)
    pools: list[str]
    instances: dict[str, int]
    secret_keys: list[str]
    secrets_version: int


class PoolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=63, pattern=TEXT)
    flake: str | None = Field(default=None, max_length=4096, pattern=TEXT)
    profile: str = Field(default="minimal", max_length=256, pattern=TEXT)
    cpus: int = Field(default=1, ge=-BIG, le=BIG)
    mem: int = Field(default=256, ge=-BIG, le=BIG)
    data_disk: int = Field(default=0, ge=-BIG, le=BIG)
    network: Literal["tenant", "none"] = "tenant"
    #: Idle policy, as `pool create` takes it: durations like 30s, 5m, 1h (0 or off: never).
    idle_warm: str | None = Field(default=None, max_length=64, pattern=TEXT)
    idle_sleep: str | None = Field(default=None, max_length=64, pattern=TEXT)
    min_running: int = Field(default=0, ge=-BIG, le=BIG)
    pinned: bool = False
    #: qemu or firecracker; "": the host's (setting backend).
    backend: str = Field(default="", max_length=64, pattern=TEXT)
    #: How long a hypervisor that does not answer is given before it is ended (default 30s).
    unresponsive_grace: str | None = Field(default=None, max_length=64, pattern=TEXT)


class PolicyIn(BaseModel):
    """`pool update`: what is not given stays."""

    model_config = ConfigDict(extra="forbid")
    idle_warm: str | None = Field(default=None, max_length=64, pattern=TEXT)
    idle_sleep: str | None = Field(default=None, max_length=64, pattern=TEXT)
    min_running: int | None = Field(default=None, ge=-BIG, le=BIG)
    pinned: bool | None = None
    unresponsive_grace: str | None = Field(default=None, max_length=64, pattern=TEXT)


class PoolInstance(BaseModel):
    id: str
    state: State
    revision: str | None


def _pool_fields() -> dict[str, Any]:
    """The pool record's fields, each required (so that a field the model gains shows up)."""
    hints = typing.get_type_hints(Pool)
    return {f.name: (hints[f.name], ...) for f in dataclasses.fields(Pool)}


#: `mvm pool info`: the pool's record, then its revision count, last builds and instances.
PoolInfo: type[BaseModel] = create_model(
    "PoolInfo", **_pool_fields(), revisions=(int, ...), builds=(list[dict[str, Any]], ...),
    instances=(list[PoolInstance], ...))


class ScaleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    running: int = Field(default=0, ge=0, le=100_000)
    warm: int = Field(default=0, ge=0, le=100_000)
    sleeping: int = Field(default=0, ge=0, le=100_000)


class BuildIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: bool = False
    builder: Literal["vm", "host"] | None = None
    builder_cpus: int = Field(default=2, ge=-BIG, le=BIG)
    builder_mem: int = Field(default=1024, ge=-BIG, le=BIG)
    timeout: float = Field(default=1800, allow_inf_nan=False)


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    revision: str | None = Field(default=None, max_length=64, pattern=TEXT)


class RollbackOut(BaseModel):
    pool: str
    current: str


class RevisionOut(BaseModel):
    revision: str
    current: bool
    in_use: bool
    out_path: str
    created: float
    manifest: dict[str, Any]


class InstanceOut(BaseModel):
    """An instance as `--json` shows it (scale's result)."""

    id: str
    pool: str
    tenant: str
    state: State
    revision: str | None
    ip: str | None
    mac: str | None
    secrets_version: int
    error: str | None
    address: str
    transition: str | None
    snapshot: str | None


class InstanceView(InstanceOut):
    """With what its hypervisor says (empty: it agrees with the store)."""

    observed: str


class InstanceInfo(InstanceView):
    data_disk: str | None
    pool_current_revision: str | None
    #: Its running hypervisor: "jailed" or "unjailed: <why>"; null when none runs.
    jail: str | None


class TransitionOut(BaseModel):
    address: str
    state: State


class ExecIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    argv: list[str] = Field(min_length=1, max_length=4096)
    timeout: float = Field(default=60.0, allow_inf_nan=False)
    max_output: int = Field(default=16 << 20, ge=-BIG, le=BIG)


class ExecOut(BaseModel):
    exit_code: int
    timed_out: bool
    #: The bytes as the guest wrote them, base64.
    stdout_b64: str
    stderr_b64: str
    #: Streams cut at max_output → bytes the command wrote to them.
    truncated: dict[str, int]
    #: `resume` or `wake` when the instance was brought back to run the command.
    brought_back: str | None = None
    #: Always true in an answer: the command ran (a failure is an ErrorOut with `started`).
    started: bool = True


class EventOut(BaseModel):
    id: int
    ts: float
    tenant: str | None = None
    pool: str | None = None
    instance: str | None = None
    kind: str
    message: str
    reason: str = "user"
    cause: str | None = None
    duration: float | None = None


class OperationOut(BaseModel):
    """A long operation (build, scale): 202 at once, then `GET /operations/{id}`."""

    id: str
    kind: Literal["build", "scale"]
    target: str
    status: Literal["running", "succeeded", "failed"]
    progress: list[str]
    started: float
    finished: float | None = None
    result: Any = None
    error: ErrorOut | None = None
