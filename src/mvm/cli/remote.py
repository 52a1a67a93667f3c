"""The CLI through the agent (`--agent SOCKET` / MVM_AGENT): the same commands, asked of the
agent's REST API over its Unix socket (or `http://HOST:PORT` with the token in
MVM_AGENT_TOKEN). Answers come back in the shapes the commands print (`services.views`), and
refusals as the same errors, so a command prints the same either way."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from mvm import errors
from mvm.errors import MvmError
from mvm.model import Tenant

#: Seconds to wait for an answer (an exec or a transition takes as long as it takes).
TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=10.0)


def _error(body: Any, status: int) -> MvmError:
    if not isinstance(body, dict) or "error" not in body:
        return MvmError(f"the agent answered {status}: {str(body)[:200]}")
    cls = getattr(errors, str(body.get("kind")), None)
    if not (isinstance(cls, type) and issubclass(cls, MvmError)) or cls is errors.CommandFailed:
        cls = MvmError
    e = cls(str(body["error"]), body.get("hint"))
    if isinstance(body.get("exit_code"), int):
        e.exit_code = body["exit_code"]
    return e


class AgentApi:
    """The agent's REST API, as the CLI asks it (not the agent itself: `services.agent.Agent`;
    nor the guest's agent: `guest.agent_client.GuestAgentClient`)."""

    def __init__(self, where: str) -> None:
        self.where = where
        if where.startswith(("http://", "https://")):
            token = os.environ.get("MVM_AGENT_TOKEN", "")
            self.http = httpx.Client(base_url=where, timeout=TIMEOUT,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        else:
            self.http = httpx.Client(transport=httpx.HTTPTransport(uds=where), base_url="http://mvm-agent",
                                     timeout=TIMEOUT)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise MvmError(f"cannot reach the agent at {self.where}: {e}",
                           "start it (`mvm agent serve`), or run the command without --agent / MVM_AGENT") from None
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code >= 400:
            raise _error(body, r.status_code)
        return body

    def wait(self, op: dict[str, Any], report: Callable[[str], None]) -> Any:
        """Follow a long operation to its end, reporting its progress lines as they come."""
        seen = 0
        delay = 0.05
        while True:
            for line in op["progress"][seen:]:
                report(line)
            seen = len(op["progress"])
            if op["status"] == "succeeded":
                return op["result"]
            if op["status"] == "failed":
                raise _error(op["error"], 0)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
            op = self.call("GET", f"/operations/{quote(op['id'], safe='')}")

    # -- the commands ------------------------------------------------------------
    def tenants(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.call("GET", "/tenants")
        return out

    def tenant_info(self, tenant: str) -> dict[str, Any]:
        out: dict[str, Any] = self.call("GET", f"/tenants/{_seg(tenant)}")
        return out

    def pools(self, tenant: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.call("GET", "/pools", params=_params(tenant=tenant))
        return out

    def pool_info(self, pool: str) -> dict[str, Any]:
        out: dict[str, Any] = self.call("GET", _pool(pool))
        return out

    def revisions(self, pool: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.call("GET", _pool(pool) + "/revisions")
        return out

    def rollback(self, pool: str, revision: str | None) -> str:
        return str(self.call("POST", _pool(pool) + "/rollback", json={"revision": revision})["current"])

    def scale(self, pool: str, running: int, warm: int, sleeping: int,
              report: Callable[[str], None]) -> list[dict[str, Any]]:
        op = self.call("POST", _pool(pool) + "/scale", json={"running": running, "warm": warm, "sleeping": sleeping})
        out: list[dict[str, Any]] = self.wait(op, report)
        return out

    def build(self, pool: str, body: dict[str, Any], report: Callable[[str], None]) -> dict[str, Any]:
        out: dict[str, Any] = self.wait(self.call("POST", _pool(pool) + "/build", json=body), report)
        return out

    def instances(self, where: str | None) -> list[dict[str, Any]]:
        tenant, _, pool = (where or "").partition("/")
        out: list[dict[str, Any]] = self.call("GET", "/instances", params=_params(tenant=tenant, pool=pool))
        return out

    def instance_info(self, instance: str) -> dict[str, Any]:
        out: dict[str, Any] = self.call("GET", _instance(instance))
        return out

    def transition(self, instance: str, action: str) -> dict[str, Any]:
        out: dict[str, Any] = self.call("POST", _instance(instance) + f"/actions/{_seg(action)}")
        return out

    def exec(self, instance: str, argv: list[str], timeout: float, max_output: int) -> dict[str, Any]:
        r: dict[str, Any] = self.call("POST", _instance(instance) + "/exec",
                                      json={"argv": argv, "timeout": timeout, "max_output": max_output})
        r["stdout"] = base64.b64decode(r.pop("stdout_b64"))
        r["stderr"] = base64.b64decode(r.pop("stderr_b64"))
        return r

    def event_store(self) -> EventStore:
        return EventStore(self)

    def events(self, tenant: str | None = None, limit: int = 100, after: int | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.call("GET", "/events", params=_params(tenant=tenant, limit=limit,
                                                                                 after=after))
        return out


class EventStore:
    """What `mvm events` reads of the store (tenants and events), asked of the agent."""

    def __init__(self, agent: AgentApi) -> None:
        self.agent = agent

    def tenants(self) -> list[Tenant]:
        return [Tenant(t["id"], t["net_id"], t["subnet"]) for t in self.agent.tenants()]

    def events(self, tenant: str | None = None, limit: int = 100,
               after: int | None = None) -> list[dict[str, object]]:
        """As the store gives them: the newest first, or with `after` the oldest first."""
        rows: list[dict[str, object]] = self.agent.events(tenant, limit, after)  # (oldest first)
        return rows if after is not None else rows[::-1]


def _params(**kw: object) -> dict[str, str]:
    return {k: str(v) for k, v in kw.items() if v not in (None, "")}


def _seg(text: str) -> str:
    return quote(text, safe="")


def _pool(address: str) -> str:
    from mvm.model import PoolRef

    ref = PoolRef.parse(address)
    return f"/tenants/{_seg(ref.tenant)}/pools/{_seg(ref.pool)}"


def _instance(address: str) -> str:
    from mvm.model import InstanceRef

    ref = InstanceRef.parse(address)
    return f"/tenants/{_seg(ref.tenant)}/pools/{_seg(ref.pool)}/instances/{_seg(ref.instance)}"
