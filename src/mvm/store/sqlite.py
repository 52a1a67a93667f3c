"""Desired and observed state in one embedded SQLite database (WAL): the `Store` protocol.

The only module that speaks SQL. Compare-and-set on an instance's state and transition in
flight; each event goes in the same transaction as the change it describes; a change made under
a lease checks the lease's fencing token (table `fences`, where `SqliteFences` grants them to
the flock leases) in that transaction. Reading never writes (a full disk must not stop `list`
or `info`): schema changes happen only when missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from mvm.errors import Conflict, HostUnsupported, NotFound, Superseded
from mvm.model import Action, Event, Instance, Op, Pool, Quotas, Revision, State, Tenant
from mvm.store.base import Lease
from mvm.util import private

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
  id TEXT PRIMARY KEY, net_id INTEGER NOT NULL UNIQUE, subnet TEXT NOT NULL UNIQUE,
  quotas TEXT NOT NULL, secrets_version INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pools (
  tenant TEXT NOT NULL REFERENCES tenants(id), id TEXT NOT NULL, flake TEXT NOT NULL,
  profile TEXT NOT NULL, cpus INTEGER NOT NULL, mem INTEGER NOT NULL,
  data_disk INTEGER NOT NULL DEFAULT 0, network TEXT NOT NULL DEFAULT 'tenant',
  current TEXT, desired_running INTEGER NOT NULL DEFAULT 0,
  desired_warm INTEGER NOT NULL DEFAULT 0, desired_sleeping INTEGER NOT NULL DEFAULT 0,
  created REAL NOT NULL, PRIMARY KEY (tenant, id));
CREATE TABLE IF NOT EXISTS revisions (
  tenant TEXT NOT NULL, pool TEXT NOT NULL, hash TEXT NOT NULL, out_path TEXT NOT NULL,
  manifest TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (tenant, pool, hash));
CREATE TABLE IF NOT EXISTS builds (
  id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, pool TEXT NOT NULL,
  started REAL NOT NULL, finished REAL, status TEXT NOT NULL, revision TEXT,
  cache_hit INTEGER NOT NULL DEFAULT 0, log TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS instances (
  id TEXT PRIMARY KEY, tenant TEXT NOT NULL, pool TEXT NOT NULL, state TEXT NOT NULL,
  revision TEXT, host_index INTEGER, ip TEXT, mac TEXT,
  secrets_version INTEGER NOT NULL DEFAULT 0, pid INTEGER, created REAL NOT NULL,
  updated REAL NOT NULL, error TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS instance_address ON instances(tenant, host_index)
  WHERE host_index IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, tenant TEXT, pool TEXT,
  instance TEXT, kind TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jail_ids (owner TEXT PRIMARY KEY, n INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS fences (name TEXT PRIMARY KEY, token INTEGER NOT NULL);
"""
# Columns added after the first schema: (table, column, declaration).
MIGRATIONS = (
    ("instances", "op", "TEXT"),  # JSON of model.Op: the transition in flight
    ("instances", "snapshot", "TEXT"),  # the committed snapshot's name
    ("events", "reason", "TEXT NOT NULL DEFAULT 'user'"),
    ("builds", "owner", "INTEGER"),  # pid of the command running it
    ("tenants", "egress", "TEXT"),  # JSON {"allow": [cidr…], "deny": [cidr…]}
    ("builds", "builder", "TEXT"),  # vm (the builder microVM) or host
    ("pools", "idle_warm", "REAL"),  # idle policy (the agent): seconds, NULL = never
    ("pools", "idle_sleep", "REAL"),
    ("pools", "min_running", "INTEGER NOT NULL DEFAULT 0"),
    ("pools", "pinned", "INTEGER NOT NULL DEFAULT 0"),
    ("events", "cause", "TEXT"),  # what caused it: an error, the hypervisor's exit, a measurement
    ("events", "duration", "REAL"),  # seconds the transition or build it ends took
    ("pools", "backend", "TEXT NOT NULL DEFAULT ''"),  # qemu, firecracker, or '' (the host's)
    ("pools", "flake_id", "TEXT NOT NULL DEFAULT ''"),  # device:inode of the flake's directory
    ("pools", "build_disk", "INTEGER NOT NULL DEFAULT 0"),  # MiB its builder store and revisions hold
    ("pools", "unresponsive_grace", "REAL NOT NULL DEFAULT 30"),  # seconds (observe.py)
    ("instances", "unresponsive_since", "REAL"),  # its hypervisor stopped answering then
    ("instances", "unresponsive_cause", "TEXT"),
)
#: What `events()` returns of each event, in this order.
EVENT_KEYS = ("id", "ts", "tenant", "pool", "instance", "kind", "message", "reason", "cause",
              "duration")
#: A state home mvm makes: passed through, not listed (what is below it is 0700 and 0600).
HOME_MODE = 0o711
_INSTANCE_COLS = ("id", "tenant", "pool", "state", "revision", "host_index", "ip", "mac",
                  "secrets_version", "pid", "created", "updated", "error", "op", "snapshot",
                  "unresponsive_since", "unresponsive_cause")


def _egress_json(allow: tuple[str, ...], deny: tuple[str, ...]) -> str | None:
    return json.dumps({"allow": list(allow), "deny": list(deny)}) if allow or deny else None


class SqliteStore:
    def __init__(self, db: Path) -> None:
        self.path = db
        if not self.path.exists():
            # 0600 from the start: SQLite gives its -wal and -shm files the database's mode
            private.mkdirs(self.path.parent, HOME_MODE)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self.read_only = False
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA busy_timeout=30000")
            if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if not self.path.exists():
                raise
            # A WAL database needs its -shm file to be opened at all, which a full disk may
            # refuse: reading must still work (`list`, `info`), so fall back to a read-only,
            # lock-free view of the last checkpointed state. Writes then fail clearly.
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True,
                                      isolation_level=None)
            self.read_only = True
        self.db.row_factory = sqlite3.Row
        if self.read_only:
            return
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"tenants", "pools", "revisions", "builds", "instances", "events", "fences"} <= tables:
            self.db.executescript(SCHEMA)
        for table, col, decl in MIGRATIONS:
            cols = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if col not in cols:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def tx(self, fence: Lease | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction; with `fence`, only while that lease is the lock's last grant."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._unwritable(e) from e
        try:
            if fence is not None:
                _check_fence(self.db, fence)
            yield self.db
        except sqlite3.OperationalError as e:
            self.db.execute("ROLLBACK")
            raise self._unwritable(e) from e
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise self._unwritable(e) from e

    def _unwritable(self, e: sqlite3.OperationalError) -> Exception:
        text = str(e)
        if self.read_only or any(w in text for w in ("full", "readonly", "disk I/O")):
            return HostUnsupported(f"cannot write mvm's state in {self.path}: {text}",
                                   "free space on that disk, then retry (nothing was changed)")
        return e

    # -- tenants ---------------------------------------------------------
    def add_tenant(self, t: Tenant, event: Event | None = None, *,
                   fence: Lease | None = None) -> None:
        try:
            with self.tx(fence) as db:
                db.execute(
                    "INSERT INTO tenants (id, net_id, subnet, quotas, secrets_version, created,"
                    " egress) VALUES (?,?,?,?,?,?,?)",
                    (t.id, t.net_id, t.subnet, json.dumps(asdict(t.quotas)), t.secrets_version,
                     t.created or time.time(), _egress_json(t.egress_allow, t.egress_deny)),
                )
                self._event(db, event)
        except sqlite3.IntegrityError as e:
            raise Conflict(f"tenant {t.id!r} conflicts with an existing tenant ({e})") from e

    def tenants(self) -> list[Tenant]:
        return [self._tenant(r) for r in self.db.execute("SELECT * FROM tenants ORDER BY id")]

    def tenant(self, tid: str) -> Tenant:
        row = self.db.execute("SELECT * FROM tenants WHERE id=?", (tid,)).fetchone()
        if row is None:
            raise NotFound(f"no tenant {tid!r}", "see `mvm tenant list`, or create it with `mvm tenant create`")
        return self._tenant(row)

    def bump_secrets_version(self, tid: str, event: Event | None = None, *,
                             fence: Lease | None = None) -> int:
        with self.tx(fence) as db:
            db.execute("UPDATE tenants SET secrets_version = secrets_version + 1 WHERE id=?", (tid,))
            self._event(db, event)
            return self.tenant(tid).secrets_version

    def remove_tenant(self, tid: str, event: Event | None = None, *,
                      fence: Lease | None = None) -> None:
        with self.tx(fence) as db:
            db.execute("DELETE FROM tenants WHERE id=?", (tid,))
            db.execute("DELETE FROM jail_ids WHERE owner=?", (f"tenant:{tid}",))
            self._event(db, event)

    def set_tenant_egress(self, tid: str, allow: tuple[str, ...], deny: tuple[str, ...],
                          event: Event | None = None, *, fence: Lease | None = None) -> Tenant:
        with self.tx(fence) as db:
            db.execute("UPDATE tenants SET egress=? WHERE id=?", (_egress_json(allow, deny), tid))
            self._event(db, event)
            return self.tenant(tid)

    @staticmethod
    def _tenant(r: sqlite3.Row) -> Tenant:
        cols = r.keys()  # (a Row's `in` looks at values, not column names)
        egress = json.loads(r["egress"]) if "egress" in cols and r["egress"] else {}
        return Tenant(r["id"], r["net_id"], r["subnet"], Quotas(**json.loads(r["quotas"])),
                      r["secrets_version"], r["created"],
                      egress_allow=tuple(egress.get("allow", ())),
                      egress_deny=tuple(egress.get("deny", ())))

    # -- pools -----------------------------------------------------------
    def add_pool(self, p: Pool, event: Event | None = None, *,
                 fence: Lease | None = None) -> None:
        try:
            with self.tx(fence) as db:
                db.execute(
                    "INSERT INTO pools (tenant,id,flake,profile,cpus,mem,data_disk,network,created,"
                    "idle_warm,idle_sleep,min_running,pinned,backend,flake_id,unresponsive_grace)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (p.tenant, p.id, p.flake, p.profile, p.cpus, p.mem, p.data_disk, p.network,
                     p.created or time.time(), p.idle_warm, p.idle_sleep, p.min_running,
                     int(p.pinned), p.backend, p.flake_id, p.unresponsive_grace),
                )
                self._event(db, event)
        except sqlite3.IntegrityError as e:
            raise Conflict(f"pool {p.tenant}/{p.id} already exists",
                           "choose another name or `mvm pool destroy` it first") from e

    def pools(self, tenant: str | None = None) -> list[Pool]:
        if tenant is None:
            rows = self.db.execute("SELECT * FROM pools ORDER BY tenant, id")
        else:
            rows = self.db.execute("SELECT * FROM pools WHERE tenant=? ORDER BY id", (tenant,))
        return [self._pool(r) for r in rows]

    def pool(self, tenant: str, pid: str) -> Pool:
        row = self.db.execute("SELECT * FROM pools WHERE tenant=? AND id=?", (tenant, pid)).fetchone()
        if row is None:
            raise NotFound(f"no pool {tenant}/{pid}",
                           f"see `mvm pool list {tenant}`, or create it with `mvm pool create`")
        return self._pool(row)

    def set_pool_current(self, tenant: str, pid: str, rev: str | None,
                         event: Event | None = None, *, fence: Lease | None = None) -> None:
        with self.tx(fence) as db:
            db.execute("UPDATE pools SET current=? WHERE tenant=? AND id=?", (rev, tenant, pid))
            self._event(db, event)

    def set_pool_desired(self, tenant: str, pid: str, running: int, warm: int, sleeping: int,
                         event: Event | None = None, *, fence: Lease | None = None) -> None:
        with self.tx(fence) as db:
            db.execute(
                "UPDATE pools SET desired_running=?, desired_warm=?, desired_sleeping=?"
                " WHERE tenant=? AND id=?", (running, warm, sleeping, tenant, pid))
            self._event(db, event)

    def remove_pool(self, tenant: str, pid: str, event: Event | None = None, *,
                    fence: Lease | None = None) -> None:
        with self.tx(fence) as db:
            db.execute("DELETE FROM revisions WHERE tenant=? AND pool=?", (tenant, pid))
            db.execute("DELETE FROM builds WHERE tenant=? AND pool=?", (tenant, pid))
            db.execute("DELETE FROM pools WHERE tenant=? AND id=?", (tenant, pid))
            self._event(db, event)

    @staticmethod
    def _pool(r: sqlite3.Row) -> Pool:
        cols = r.keys()  # (a Row's `in` looks at values; a read-only view of an older database
        policy = {k: r[k] for k in ("idle_warm", "idle_sleep", "min_running", "pinned")  # lacks them)
                  if k in cols}
        return Pool(r["tenant"], r["id"], r["flake"], r["profile"], r["cpus"], r["mem"],
                    r["data_disk"], r["network"], r["current"], r["desired_running"],
                    r["desired_warm"], r["desired_sleeping"], r["created"],
                    policy.get("idle_warm"), policy.get("idle_sleep"),
                    policy.get("min_running") or 0, bool(policy.get("pinned")),
                    r["backend"] if "backend" in cols else "",
                    r["flake_id"] if "flake_id" in cols else "",
                    r["build_disk"] if "build_disk" in cols else 0,
                    r["unresponsive_grace"] if "unresponsive_grace" in cols else Pool.unresponsive_grace)

    def set_pool_policy(self, tenant: str, pid: str, idle_warm: float | None,
                        idle_sleep: float | None, min_running: int, pinned: bool,
                        event: Event | None = None, *, fence: Lease | None = None,
                        unresponsive_grace: float | None = None) -> None:
        with self.tx(fence) as db:
            db.execute("UPDATE pools SET idle_warm=?, idle_sleep=?, min_running=?, pinned=?"
                       " WHERE tenant=? AND id=?",
                       (idle_warm, idle_sleep, min_running, int(pinned), tenant, pid))
            if unresponsive_grace is not None:
                db.execute("UPDATE pools SET unresponsive_grace=? WHERE tenant=? AND id=?",
                           (unresponsive_grace, tenant, pid))
            self._event(db, event)

    def set_pool_flake_id(self, tenant: str, pid: str, flake_id: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE pools SET flake_id=? WHERE tenant=? AND id=?", (flake_id, tenant, pid))

    def set_pool_build_disk(self, tenant: str, pid: str, mib: int) -> None:
        with self.tx() as db:
            db.execute("UPDATE pools SET build_disk=? WHERE tenant=? AND id=?", (mib, tenant, pid))

    def version(self) -> int:
        """A number that changes when another connection commits a change (SQLite's
        data_version): how the agent notices, each second, that the fleet's state changed."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    # -- revisions and builds ---------------------------------------------
    def add_revision(self, r: Revision, event: Event | None = None, *,
                     fence: Lease | None = None) -> None:
        with self.tx(fence) as db:
            db.execute("INSERT OR REPLACE INTO revisions VALUES (?,?,?,?,?,?)",
                       (r.tenant, r.pool, r.hash, r.out_path, json.dumps(r.manifest), r.created))
            self._event(db, event)

    def revisions(self, tenant: str, pid: str) -> list[Revision]:
        rows = self.db.execute(
            "SELECT * FROM revisions WHERE tenant=? AND pool=? ORDER BY created, hash", (tenant, pid))
        return [Revision(r["tenant"], r["pool"], r["hash"], r["out_path"], json.loads(r["manifest"]),
                         r["created"]) for r in rows]

    def remove_revisions(self, tenant: str, pid: str, revs: Sequence[str],
                         event: Event | None = None, *, fence: Lease | None = None) -> None:
        with self.tx(fence) as db:
            db.executemany("DELETE FROM revisions WHERE tenant=? AND pool=? AND hash=?",
                           [(tenant, pid, rev) for rev in revs])
            self._event(db, event)

    def start_build(self, tenant: str, pid: str, log: str, builder: str = "host",
                    event: Event | None = None, *, fence: Lease | None = None) -> int:
        with self.tx(fence) as db:
            cur = db.execute("INSERT INTO builds (tenant,pool,started,status,log,owner,builder)"
                             " VALUES (?,?,?,?,?,?,?)",
                             (tenant, pid, time.time(), "running", log, os.getpid(), builder))
            self._event(db, event)
        return int(cur.lastrowid or 0)

    def finish_build(self, build_id: int, status: str, revision: str | None = None,
                     cache_hit: bool = False, error: str | None = None,
                     event: Event | None = None, *, fence: Lease | None = None) -> None:
        with self.tx(fence) as db:
            db.execute("UPDATE builds SET finished=?, status=?, revision=?, cache_hit=?, error=?"
                       " WHERE id=?", (time.time(), status, revision, int(cache_hit), error, build_id))
            self._event(db, event)

    def builds(self, tenant: str, pid: str) -> list[dict[str, object]]:
        """The pool's builds; one still `running` whose command is gone shows as `interrupted`
        (read-only: the next build of the pool records it)."""
        rows = self.db.execute("SELECT * FROM builds WHERE tenant=? AND pool=? ORDER BY id", (tenant, pid))
        out = [dict(r) for r in rows]
        for b in out:
            if b["status"] == "running" and not _running(b.get("owner")):
                b["status"] = "interrupted"
        return out

    def interrupt_builds(self, tenant: str, pid: str, event: Event | None = None, *,
                         fence: Lease | None = None) -> int:
        """Record builds whose command died as interrupted, and `event` when there were any
        (the caller holds the pool's lock). One already recorded (it has its `finished` time)
        is not recorded or announced again."""
        gone = [b["id"] for b in self.builds(tenant, pid) if b["status"] == "interrupted" and not b["finished"]]
        with self.tx(fence) as db:
            for bid in gone:
                db.execute("UPDATE builds SET status='interrupted', finished=?,"
                           " error='the command running it died' WHERE id=?", (time.time(), bid))
            if gone:
                self._event(db, event)
        return len(gone)

    # -- instances -------------------------------------------------------
    def add_instance(self, i: Instance, event: Event | None = None, *,
                     fence: Lease | None = None) -> None:
        now = time.time()
        try:
            with self.tx(fence) as db:
                db.execute(
                    f"INSERT INTO instances ({','.join(_INSTANCE_COLS)}) VALUES"
                    f" ({','.join('?' * len(_INSTANCE_COLS))})",
                    (i.id, i.tenant, i.pool, i.state.value, i.revision, i.host_index, i.ip, i.mac,
                     i.secrets_version, i.pid, now, now, i.error, _op_json(i.op), i.snapshot,
                     i.unresponsive_since, i.unresponsive_cause))
                self._event(db, event)
        except sqlite3.IntegrityError as e:  # the address (or ID) is taken: never two alike
            raise Conflict(f"instance {i.id} of tenant {i.tenant} clashes with another ({e})",
                           "retry the command") from e

    def instances(self, tenant: str | None = None, pool: str | None = None) -> list[Instance]:
        q, args = "SELECT * FROM instances", []
        if tenant is not None:
            q += " WHERE tenant=?"
            args.append(tenant)
            if pool is not None:
                q += " AND pool=?"
                args.append(pool)
        rows = self.db.execute(q + " ORDER BY created, id", args)
        return [self._instance(r) for r in rows]

    def instance(self, tenant: str, pool: str, iid: str) -> Instance:
        row = self.db.execute("SELECT * FROM instances WHERE id=? AND tenant=? AND pool=?",
                              (iid, tenant, pool)).fetchone()
        if row is None:
            raise NotFound(f"no instance {tenant}/{pool}/{iid}", f"see `mvm instance list {tenant}/{pool}`")
        return self._instance(row)

    def _by_id(self, db: sqlite3.Connection, iid: str) -> Instance:
        row = db.execute("SELECT * FROM instances WHERE id=?", (iid,)).fetchone()
        if row is None:
            raise NotFound(f"no instance {iid}")
        return self._instance(row)

    def update_instance(self, iid: str, *, expect: State | None = None, event: Event | None = None,
                        fence: Lease | None = None, **fields: object) -> None:
        """Set fields; with `expect`, only if the instance is in that state (else Conflict)."""
        with self.tx(fence) as db:
            if expect is not None:
                cur = self._by_id(db, iid)
                if cur.state is not expect:
                    raise Conflict(f"instance {iid} is {cur.state.value}, not {expect.value}",
                                   "another command changed it; retry")
            self._set(db, iid, fields)
            self._event(db, event)

    def remove_instance(self, iid: str, event: Event | None = None, *,
                        fence: Lease | None = None) -> None:
        with self.tx(fence) as db:
            db.execute("DELETE FROM instances WHERE id=?", (iid,))
            db.execute("DELETE FROM jail_ids WHERE owner=?", (f"instance:{iid}",))
            self._event(db, event)

    # -- transitions in flight ---------------------------------------------
    def begin_op(self, iid: str, op: Op, event: Event | None = None, *,
                 fence: Lease | None = None) -> Instance:
        """Record a transition before it acts: only from `op.source` and with none in flight."""
        with self.tx(fence) as db:
            cur = self._by_id(db, iid)
            if cur.op is not None:
                raise Conflict(f"instance {iid} is in the middle of {cur.op.action.value} "
                               f"({cur.op.owner})", "retry once it has finished")
            if cur.state is not op.source:
                raise Conflict(f"instance {iid} is {cur.state.value}, not {op.source.value}",
                               "another command changed it; retry")
            op = replace(op, started=op.started or time.time())
            self._set(db, iid, {"op": _op_json(op)})
            self._event(db, event)
            return self._by_id(db, iid)

    def op_step(self, iid: str, step: str, *, expect: Op, fence: Lease | None = None,
                **fields: object) -> Instance:
        """Record one completed step of the transition in flight, with the fields it changed:
        only while `expect` is the one in flight."""
        with self.tx(fence) as db:
            cur = _in_flight(self._by_id(db, iid), expect)
            op = replace(cur, steps=(*cur.steps, step))
            self._set(db, iid, {**fields, "op": _op_json(op)})
            return self._by_id(db, iid)

    def end_op(self, iid: str, state: State, event: Event | None = None, *, expect: Op,
               fence: Lease | None = None, **fields: object) -> Instance:
        """The transition is over (done, rolled back or resumed): its end state, its event;
        only while `expect` is the one in flight."""
        with self.tx(fence) as db:
            _in_flight(self._by_id(db, iid), expect)
            self._set(db, iid, {**fields, "state": state, "op": None})
            self._event(db, event)
            return self._by_id(db, iid)

    @staticmethod
    def _set(db: sqlite3.Connection, iid: str, fields: dict[str, object]) -> None:
        if "state" in fields:
            # A new state is a new hypervisor or none: what was observed of the old one is over.
            fields.setdefault("unresponsive_since", None)
            fields.setdefault("unresponsive_cause", None)
        if "state" in fields and isinstance(fields["state"], State):
            fields["state"] = fields["state"].value
        bad = set(fields) - set(_INSTANCE_COLS)
        if bad:
            raise ValueError(f"unknown instance fields {bad}")
        cols = ", ".join(f"{k}=?" for k in fields)
        db.execute(f"UPDATE instances SET {cols}{', ' if cols else ''}updated=? WHERE id=?",
                   (*fields.values(), time.time(), iid))

    @staticmethod
    def _instance(r: sqlite3.Row) -> Instance:
        cols = r.keys()  # (an older database's read-only view lacks the newer columns)
        return Instance(r["id"], r["tenant"], r["pool"], State(r["state"]), r["revision"],
                        r["host_index"], r["ip"], r["mac"], r["secrets_version"], r["pid"],
                        r["created"], r["updated"], r["error"], _op(r["op"]), r["snapshot"],
                        *((r["unresponsive_since"], r["unresponsive_cause"])
                          if "unresponsive_since" in cols else (None, None)))

    # -- events ----------------------------------------------------------
    @staticmethod
    def _event(db: sqlite3.Connection, e: Event | None) -> None:
        if e is not None:
            db.execute("INSERT INTO events (ts,tenant,pool,instance,kind,message,reason,cause,"
                       "duration) VALUES (?,?,?,?,?,?,?,?,?)",
                       (time.time(), e.tenant, e.pool, e.instance, e.kind, e.message, e.reason.value,
                        e.cause, e.duration))

    # -- jail ids -----------------------------------------------------------
    def jail_number(self, owner: str) -> int:
        """The owner's number (`tenant:<t>`, `instance:<i>`), allocated on first use: the
        smallest one free, ≥ 1; kept until the owner is removed."""
        with self.tx() as db:
            row = db.execute("SELECT n FROM jail_ids WHERE owner=?", (owner,)).fetchone()
            if row is not None:
                return int(row[0])
            n = db.execute("SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM jail_ids WHERE n=1) THEN 1"
                           " ELSE (SELECT MIN(n) + 1 FROM jail_ids j WHERE NOT EXISTS"
                           " (SELECT 1 FROM jail_ids k WHERE k.n = j.n + 1)) END").fetchone()[0]
            db.execute("INSERT INTO jail_ids (owner, n) VALUES (?, ?)", (owner, n))
            return int(n)

    def event(self, e: Event) -> None:
        with self.tx() as db:
            self._event(db, e)

    def events(self, tenant: str | None = None, limit: int = 100,
               after: int | None = None) -> list[dict[str, object]]:
        """The newest `limit` events (newest first), of one tenant or all; with `after`, the
        first `limit` events whose id is greater (oldest first: what a follower reads next)."""
        where: list[str] = []
        args: list[object] = []
        if tenant:
            where.append("tenant=?")
            args.append(tenant)
        if after is not None:
            where.append("id>?")
            args.append(after)
        q = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "")
        q += " ORDER BY id" + ("" if after is not None else " DESC") + " LIMIT ?"
        rows = [dict(r) for r in self.db.execute(q, (*args, max(0, limit)))]
        # (a read-only view of an older database may lack the newer columns)
        return [{k: r.get(k) for k in EVENT_KEYS} for r in rows]


def _check_fence(db: sqlite3.Connection, lease: Lease) -> None:
    """In the write's own transaction: the lock was not granted again since `lease`."""
    row = db.execute("SELECT token FROM fences WHERE name=?", (lease.name,)).fetchone()
    last = int(row[0]) if row is not None else 0
    if last != lease.token:
        raise Superseded(f"this command lost its lock {lease.name} (granted again since: token "
                       f"{last}, not {lease.token}); nothing was written",
                       "another command holds it now: see `mvm events`, then retry")


def _in_flight(i: Instance, expect: Op) -> Op:
    """The transition in flight, if it is the one the caller holds (its action, owner and
    start); else a Conflict."""
    cur = i.op
    if cur is None:
        raise Superseded(f"instance {i.id} has no {expect.action.value} in flight any more "
                       "(another command finished it)", "see `mvm instance info`, then retry")
    if (cur.action, cur.owner, cur.started) != (expect.action, expect.owner, expect.started):
        raise Superseded(f"instance {i.id} is in the middle of another transition: "
                       f"{cur.action.value} ({cur.owner}), not this command's "
                       f"{expect.action.value} ({expect.owner})",
                       "another command took it over; see `mvm instance info`, then retry")
    return cur


class SqliteFences:
    """The fencing tokens of the flock leases (`FileLocks`), in the store's database: a grant
    increments its lock's token in a transaction, and a write under a lease compares it in the
    write's own transaction. One connection per thread and process (shared by nothing)."""

    def __init__(self, db: Path) -> None:
        self.path = db
        self._local = threading.local()

    def grant(self, name: str) -> int:
        with self._store().tx() as db:
            row = db.execute("INSERT INTO fences (name, token) VALUES (?, 1) ON CONFLICT(name)"
                             " DO UPDATE SET token = token + 1 RETURNING token", (name,)).fetchone()
            return int(row[0])

    def _store(self) -> SqliteStore:
        mine: tuple[int, SqliteStore] | None = getattr(self._local, "store", None)
        if mine is None or mine[0] != os.getpid():  # (a forked child never uses its parent's)
            mine = (os.getpid(), SqliteStore(self.path))
            # A grant need not survive a power loss (no holder does), only stay in order: no
            # fsync of its own (WAL keeps the order).
            mine[1].db.execute("PRAGMA synchronous=NORMAL")
            self._local.store = mine
        return mine[1]


def _running(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    from mvm.util.pids import is_running

    return is_running(pid)


def _op_json(op: Op | None) -> str | None:
    if op is None:
        return None
    return json.dumps({"action": op.action.value, "target": op.target.value, "source": op.source.value,
                       "steps": list(op.steps), "data": op.data, "owner": op.owner,
                       "started": op.started})


def _op(text: str | None) -> Op | None:
    if not text:
        return None
    d = json.loads(text)
    return Op(Action(d["action"]), State(d["target"]), State(d["source"]), tuple(d["steps"]),
              dict(d["data"]), d["owner"], d["started"])


