"""The REST API: tenants, pools, instances, exec, events, long operations, metrics.

Each request runs the services on a `Host` of its own thread (`ctx_factory` is called once in
each worker thread: SQLite connections are per thread). Every refusal is an `MvmError`
answered with its one line and hint (`ErrorOut`) and a 4xx status; malformed requests too.
"""

from __future__ import annotations

import base64
import collections
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

from fastapi import FastAPI, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from mvm import __version__, errors
from mvm.api import metrics
from mvm.api.limits import BodyLimit
from mvm.api.models import (
    BuildIn,
    Done,
    ErrorOut,
    EventOut,
    ExecIn,
    ExecOut,
    InstanceInfo,
    InstanceView,
    OperationOut,
    PolicyIn,
    PoolIn,
    PoolInfo,
    RevisionOut,
    RollbackIn,
    RollbackOut,
    ScaleIn,
    TenantIn,
    TenantInfo,
    TransitionOut,
)
from mvm.context import Host
from mvm.errors import MvmError
from mvm.model import Action, InstanceRef, Pool, PoolRef, Quotas, State, Tenant, check_id, check_instance_id
from mvm.services import events, instances, pools, session

STATUS: dict[type[MvmError], int] = {
    errors.NotFound: 404, errors.InvalidInput: 422, errors.Conflict: 409, errors.IllegalTransition: 409,
    errors.QuotaExceeded: 409, errors.AdmissionRefused: 409, errors.BuildFailed: 422, errors.HostUnsupported: 501,
    errors.CommandFailed: 502, errors.RuntimeFailure: 502,
}
ERROR_STATUSES = (400, 401, 403, 404, 409, 413, 422, 501, 502)
#: How often a follower of the events stream looks for new events.
POLL_SECONDS = 0.5


def status_of(e: MvmError) -> int:
    for cls in type(e).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def error_body(e: MvmError) -> dict[str, Any]:
    """The error's line and hint, its class (the nearest one errors.py names) and the exit code
    the CLI gives it."""
    kind = next(c.__name__ for c in type(e).__mro__ if getattr(errors, c.__name__, None) is c)
    return {"error": e.message, "hint": e.hint, "kind": kind, "exit_code": e.exit_code}


#: Progress lines an operation keeps (the newest), and characters kept of each: a build's
#: progress carries what a tenant's flake prints, which must not grow the agent without bound.
PROGRESS_KEEP = 1000
PROGRESS_LINE = 2000


class Operation:
    """A long operation run in a thread of its own; its last progress lines are kept."""

    def __init__(self, oid: str, kind: Literal["build", "scale"], target: str) -> None:
        self.id, self.kind, self.target = oid, kind, target
        self.status: Literal["running", "succeeded", "failed"] = "running"
        self.progress: collections.deque[str] = collections.deque(maxlen=PROGRESS_KEEP)
        self.dropped = 0
        self.started = time.time()
        self.finished: float | None = None
        self.result: Any = None
        self.error: dict[str, Any] | None = None

    def line(self, text: str) -> None:
        if len(self.progress) == PROGRESS_KEEP:
            self.dropped += 1
        self.progress.append(text if len(text) <= PROGRESS_LINE else text[:PROGRESS_LINE] + " …(cut)")

    def out(self) -> OperationOut:
        lines = list(self.progress)
        if self.dropped:
            lines.insert(0, f"({self.dropped} earlier progress lines not kept)")
        return OperationOut(id=self.id, kind=self.kind, target=self.target, status=self.status,
                            progress=lines, started=self.started, finished=self.finished,
                            result=self.result, error=ErrorOut(**self.error) if self.error else None)


class Operations:
    KEEP = 200  # finished operations kept to be asked about

    def __init__(self, ctx_factory: Callable[[], Host]) -> None:
        self.ctx_factory = ctx_factory
        self.ops: dict[str, Operation] = {}
        self.lock = threading.Lock()

    def start(self, kind: Literal["build", "scale"], target: str,
              work: Callable[[Host, Operation], Any]) -> Operation:
        with self.lock:
            op = Operation(f"op-{uuid.uuid4().hex[:16]}", kind, target)
            self.ops[op.id] = op
            done = [o for o in self.ops.values() if o.status != "running"]
            for old in done[:max(0, len(done) - self.KEEP)]:
                del self.ops[old.id]

        def run() -> None:
            ctx = None
            result: Any = None
            error: dict[str, Any] | None = None
            try:
                ctx = self.ctx_factory()
                result = work(ctx, op)
            except MvmError as e:
                error = error_body(e)
            except Exception as e:  # a bug: still said, not lost with the thread
                error = {"error": f"internal error: {e.__class__.__name__}: {e}", "hint": None,
                         "kind": "MvmError", "exit_code": 70}
            finally:
                if ctx is not None:
                    session.close(ctx)
            op.finished, op.result, op.error = time.time(), result, error
            op.status = "failed" if error is not None else "succeeded"  # (last: the answer is complete)

        threading.Thread(target=run, name=f"mvm-{op.id}", daemon=True).start()
        return op

    def get(self, oid: str) -> Operation:
        op = self.ops.get(oid)
        if op is None:
            raise errors.NotFound(f"no operation {oid!r}", "operations are kept while the agent runs")
        return op


class BearerToken:
    """ASGI middleware: requests that came over TCP need `Authorization: Bearer <token>`
    (those over the Unix socket have no client address and are guarded by its owner)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("client"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                body = {"error": "missing or wrong bearer token", "hint": "send `Authorization: Bearer "
                        "<token>` with the token the agent was started with", "kind": "Unauthorized"}
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _pool(tenant: str, pool: str) -> PoolRef:
    return PoolRef(check_id("tenant", tenant), check_id("pool", pool))


def _instance(tenant: str, pool: str, instance: str) -> InstanceRef:
    return InstanceRef(check_id("tenant", tenant), check_id("pool", pool), check_instance_id(instance))


def exec_for_work(ctx: Host, ref: InstanceRef, body: ExecIn) -> ExecOut:
    """Work arriving: a warm or sleeping instance is brought back, then the command runs."""
    r, brought = instances.exec_for_work(ctx, ref, body.argv, body.timeout, body.max_output)
    return ExecOut(exit_code=r.exit_code, timed_out=r.timed_out,
                   stdout_b64=base64.b64encode(r.stdout).decode(),
                   stderr_b64=base64.b64encode(r.stderr).decode(),
                   truncated=dict(r.truncated), brought_back=brought)


def create_app(ctx_factory: Callable[[], Host], token: str | None = None,
               closing: threading.Event | None = None) -> FastAPI:
    """The API over the host `ctx_factory` composes (called once per worker thread).
    `token`: requests with a client address (TCP) must carry it as a bearer token.
    `closing`: set when the server shuts down; the events streams then end (cleanly, at once)."""
    local = threading.local()
    closing = closing or threading.Event()

    def host() -> Host:
        h: Host | None = getattr(local, "host", None)
        if h is None:
            h = local.host = ctx_factory()
        return h

    ops = Operations(ctx_factory)
    meter = metrics.Metrics(host)
    err = {code: {"model": ErrorOut} for code in ERROR_STATUSES}
    app = FastAPI(title="mvm", version=__version__, responses=err,  # type: ignore[arg-type]
                  description="Fleets of microVMs for many tenants: the agent's API.")
    app.add_middleware(BodyLimit)
    if token is not None:
        app.add_middleware(BearerToken, token=token)  # (outermost: checked first)

    @app.exception_handler(MvmError)
    async def _mvm_error(request: Request, e: MvmError) -> JSONResponse:
        return JSONResponse(error_body(e), status_of(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"invalid request: {where}: {first.get('msg', 'malformed')}",
                             "hint": "see /openapi.json", "kind": "InvalidInput"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail), "hint": getattr(e, "hint", None), "kind": "HTTPError"},
                            e.status_code, headers=e.headers)

    # -- tenants ---------------------------------------------------------------
    @app.get("/tenants", response_model=list[Tenant], tags=["tenants"])
    def tenant_list() -> Any:
        from mvm.services import views

        return views.tenant_list(host())

    @app.post("/tenants", response_model=Tenant, status_code=201, tags=["tenants"])
    def tenant_create(body: TenantIn) -> Any:
        from mvm.services import tenants, views

        t = tenants.create(host(), body.id, body.net_id, body.subnet, Quotas(**body.quotas.model_dump()),
                           body.egress_allow, body.egress_deny)
        return views.jsonable(t)

    @app.get("/tenants/{tenant}", response_model=TenantInfo, tags=["tenants"])
    def tenant_info(tenant: str) -> Any:
        from mvm.services import views

        return views.tenant_info(host(), tenant)

    @app.delete("/tenants/{tenant}", response_model=Done, tags=["tenants"])
    def tenant_destroy(tenant: str, force: bool = False) -> Any:
        from mvm.services import tenants

        tenants.destroy(host(), check_id("tenant", tenant), force)
        return {"message": f"tenant {tenant} destroyed"}

    # -- pools -------------------------------------------------------------------
    @app.get("/pools", response_model=list[Pool], tags=["pools"])
    def pool_list(tenant: str | None = None) -> Any:
        from mvm.services import views

        return views.pool_list(host(), tenant)

    @app.post("/tenants/{tenant}/pools", response_model=Pool, status_code=201, tags=["pools"])
    def pool_create(tenant: str, body: PoolIn) -> Any:
        from mvm.services import pools, views

        p = pools.create(host(), _pool(tenant, body.id), body.flake, body.profile, body.cpus, body.mem,
                         body.data_disk, body.network,
                         idle_warm=pools.parse_duration(body.idle_warm, "idle_warm") if body.idle_warm else None,
                         idle_sleep=pools.parse_duration(body.idle_sleep, "idle_sleep") if body.idle_sleep else None,
                         min_running=body.min_running, pinned=body.pinned, backend=body.backend,
                         unresponsive_grace=pools.parse_grace(body.unresponsive_grace, "unresponsive_grace")
                         if body.unresponsive_grace else None)
        return views.jsonable(p)

    @app.patch("/tenants/{tenant}/pools/{pool}", response_model=Pool, tags=["pools"])
    def pool_update(tenant: str, pool: str, body: PolicyIn) -> Any:
        """The pool's idle policy (`mvm pool update`); the agent applies it."""
        from mvm.services import pools, views

        changes: dict[str, Any] = {}
        if body.idle_warm is not None:
            changes["idle_warm"] = pools.parse_duration(body.idle_warm, "idle_warm")
        if body.idle_sleep is not None:
            changes["idle_sleep"] = pools.parse_duration(body.idle_sleep, "idle_sleep")
        p = pools.update_policy(host(), _pool(tenant, pool), min_running=body.min_running, pinned=body.pinned,
                                unresponsive_grace=pools.parse_grace(body.unresponsive_grace, "unresponsive_grace")
                                if body.unresponsive_grace is not None else None, **changes)
        return views.jsonable(p)

    @app.get("/tenants/{tenant}/pools/{pool}", response_model=PoolInfo, tags=["pools"])
    def pool_info(tenant: str, pool: str) -> Any:
        from mvm.services import views

        return views.pool_info(host(), _pool(tenant, pool))

    @app.delete("/tenants/{tenant}/pools/{pool}", response_model=Done, tags=["pools"])
    def pool_destroy(tenant: str, pool: str, force: bool = False) -> Any:
        from mvm.services import pools

        ref = _pool(tenant, pool)
        pools.destroy(host(), ref, force)
        return {"message": f"pool {ref} destroyed"}

    @app.get("/tenants/{tenant}/pools/{pool}/revisions", response_model=list[RevisionOut], tags=["pools"])
    def pool_revisions(tenant: str, pool: str) -> Any:
        from mvm.services import views

        return views.revisions(host(), _pool(tenant, pool))

    @app.post("/tenants/{tenant}/pools/{pool}/rollback", response_model=RollbackOut, tags=["pools"])
    def pool_rollback(tenant: str, pool: str, body: RollbackIn | None = None) -> Any:
        from mvm.services import pools

        ref = _pool(tenant, pool)
        return {"pool": str(ref), "current": pools.rollback(host(), ref, body.revision if body else None)}

    @app.post("/tenants/{tenant}/pools/{pool}/scale", response_model=OperationOut, status_code=202,
              tags=["pools"])
    def pool_scale(tenant: str, pool: str, body: ScaleIn) -> Any:
        ref = _pool(tenant, pool)
        pools.get(host(), ref)  # (a pool that is not there: 404 now)

        def work(ctx: Host, op: Operation) -> Any:
            from mvm.services import scale, views

            result = scale.scale(ctx, ref, body.running, body.warm, body.sleeping, report=op.line,
                                 progress=lambda step, msg: op.line(f"{step}: {msg}"))
            return [views.instance(i) for i in result]

        return ops.start("scale", str(ref), work).out()

    @app.post("/tenants/{tenant}/pools/{pool}/build", response_model=OperationOut, status_code=202,
              tags=["pools"])
    def pool_build(tenant: str, pool: str, body: BuildIn | None = None) -> Any:
        from mvm.services import builder

        ref = _pool(tenant, pool)
        pools.get(host(), ref)
        b = body or BuildIn()
        opts = builder.Options(b.builder_cpus, b.builder_mem, b.timeout)
        opts.check()

        def work(ctx: Host, op: Operation) -> Any:
            from mvm.services import pools

            rev, cached = pools.build(ctx, ref, b.force, progress=lambda step, msg: op.line(f"{step}: {msg}"),
                                      builder_kind=b.builder, options=opts)
            return {"revision": rev.hash, "cached": cached}

        return ops.start("build", str(ref), work).out()

    # -- instances ---------------------------------------------------------------
    @app.get("/instances", response_model=list[InstanceView], tags=["instances"])
    def instance_list(tenant: str | None = None, pool: str | None = None) -> Any:
        from mvm.services import views

        if pool is not None and tenant is None:
            raise errors.InvalidInput("a pool is named with its tenant", "pass tenant= too")
        return views.instance_list(host(), f"{tenant}/{pool}" if pool is not None else tenant)

    @app.get("/tenants/{tenant}/pools/{pool}/instances/{instance}", response_model=InstanceInfo,
             tags=["instances"])
    def instance_info(tenant: str, pool: str, instance: str) -> Any:
        from mvm.services import views

        return views.instance_info(host(), _instance(tenant, pool, instance))

    @app.post("/tenants/{tenant}/pools/{pool}/instances/{instance}/actions/{action}",
              response_model=TransitionOut, tags=["instances"])
    def instance_action(tenant: str, pool: str, instance: str, action: Action, keep_data: bool = False) -> Any:
        ref = _instance(tenant, pool, instance)
        if keep_data and action is not Action.DESTROY:
            raise errors.InvalidInput("keep_data is for destroy only")
        i = instances.transition(host(), ref, action, keep_data=keep_data)
        return {"address": str(ref), "state": State.DESTROYED if action is Action.DESTROY else i.state}

    @app.post("/tenants/{tenant}/pools/{pool}/instances/{instance}/exec", response_model=ExecOut,
              tags=["instances"])
    def instance_exec(tenant: str, pool: str, instance: str, body: ExecIn) -> Any:
        try:
            return exec_for_work(host(), _instance(tenant, pool, instance), body)
        except MvmError as e:  # each says whether the command started, with the CLI's exit code
            started = isinstance(e, errors.ExecLost)
            return JSONResponse(error_body(e) | {"started": started, "exit_code": errors.EXEC_LOST if started
                                                 else errors.EXEC_NOT_STARTED}, status_of(e))

    # -- events, operations, metrics -------------------------------------------
    @app.get("/events", response_model=list[EventOut], tags=["events"])
    def event_list(tenant: str | None = None, limit: int = Query(100, ge=0, le=10_000),
                   after: int | None = Query(None, ge=0, le=2**62)) -> Any:
        return events.after(host(), tenant, after, limit)

    @app.get("/events/stream", tags=["events"], response_class=StreamingResponse,
             responses={200: {"content": {"application/x-ndjson": {}},
                              "description": "one event (EventOut) as JSON per line, as they happen"}})
    def event_stream(tenant: str | None = None, after: int | None = Query(None, ge=0, le=2**62)) -> Any:
        """New events as they happen (after `after`, or from now), one JSON object a line."""
        if tenant is not None:
            check_id("tenant", tenant)
        if after is None:
            last = events.after(host(), tenant, None, 1)
            after = int(last[-1]["id"]) if last else 0

        def follow() -> Iterator[str]:
            cursor = after
            while not closing.is_set():
                rows = events.after(host(), tenant, cursor, 500)
                for r in rows:
                    cursor = int(r["id"])
                    yield json.dumps(jsonable_encoder(EventOut(**r))) + "\n"
                if not rows:
                    closing.wait(POLL_SECONDS)

        return StreamingResponse(follow(), media_type="application/x-ndjson")

    @app.get("/operations/{oid}", response_model=OperationOut, tags=["operations"])
    def operation(oid: str) -> Any:
        return ops.get(oid).out()

    @app.get("/metrics", tags=["metrics"], response_class=Response,
             responses={200: {"content": {metrics.CONTENT_TYPE: {}}, "description": "Prometheus text format"}})
    def metrics_text() -> Response:
        return Response(meter.scrape(), media_type=metrics.CONTENT_TYPE)

    def openapi() -> dict[str, Any]:
        """Errors, malformed requests included, are all `ErrorOut`."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes)
            for path in doc.get("paths", {}).values():
                for op in path.values():
                    for code, resp in op.get("responses", {}).items():
                        if code in {str(c) for c in ERROR_STATUSES}:
                            resp["content"] = {"application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorOut"}}}
            for name in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
