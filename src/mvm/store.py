"""Desired and observed state in one embedded SQLite database (WAL).

The store is the only module that speaks SQL. Its methods are the interface a
distributed store (etcd, DESIGN §9) would implement again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from mvm import paths
from mvm.errors import Conflict, NotFound
from mvm.model import Instance, Pool, Quotas, Revision, State, Tenant

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
"""


class Store:
    def __init__(self, db: Path | None = None) -> None:
        self.path = db or paths.db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA busy_timeout=30000")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- tenants ---------------------------------------------------------
    def add_tenant(self, t: Tenant) -> None:
        try:
            with self.tx() as db:
                db.execute(
                    "INSERT INTO tenants VALUES (?,?,?,?,?,?)",
                    (t.id, t.net_id, t.subnet, json.dumps(asdict(t.quotas)), t.secrets_version,
                     t.created or time.time()),
                )
        except sqlite3.IntegrityError as e:
            raise Conflict(f"tenant {t.id!r} conflicts with an existing tenant ({e})") from e

    def tenants(self) -> list[Tenant]:
        return [self._tenant(r) for r in self.db.execute("SELECT * FROM tenants ORDER BY id")]

    def tenant(self, tid: str) -> Tenant:
        row = self.db.execute("SELECT * FROM tenants WHERE id=?", (tid,)).fetchone()
        if row is None:
            raise NotFound(f"no tenant {tid!r}", "see `mvm tenant list`, or create it with `mvm tenant create`")
        return self._tenant(row)

    def bump_secrets_version(self, tid: str) -> int:
        with self.tx() as db:
            db.execute("UPDATE tenants SET secrets_version = secrets_version + 1 WHERE id=?", (tid,))
        return self.tenant(tid).secrets_version

    def remove_tenant(self, tid: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM tenants WHERE id=?", (tid,))

    @staticmethod
    def _tenant(r: sqlite3.Row) -> Tenant:
        return Tenant(r["id"], r["net_id"], r["subnet"], Quotas(**json.loads(r["quotas"])),
                      r["secrets_version"], r["created"])

    # -- pools -----------------------------------------------------------
    def add_pool(self, p: Pool) -> None:
        try:
            with self.tx() as db:
                db.execute(
                    "INSERT INTO pools (tenant,id,flake,profile,cpus,mem,data_disk,network,created)"
                    " VALUES (?,?,?,?,?,?,?,?,?)",
                    (p.tenant, p.id, p.flake, p.profile, p.cpus, p.mem, p.data_disk, p.network,
                     p.created or time.time()),
                )
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

    def set_pool_current(self, tenant: str, pid: str, rev: str | None) -> None:
        with self.tx() as db:
            db.execute("UPDATE pools SET current=? WHERE tenant=? AND id=?", (rev, tenant, pid))

    def set_pool_desired(self, tenant: str, pid: str, running: int, warm: int, sleeping: int) -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE pools SET desired_running=?, desired_warm=?, desired_sleeping=?"
                " WHERE tenant=? AND id=?", (running, warm, sleeping, tenant, pid))

    def remove_pool(self, tenant: str, pid: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM revisions WHERE tenant=? AND pool=?", (tenant, pid))
            db.execute("DELETE FROM builds WHERE tenant=? AND pool=?", (tenant, pid))
            db.execute("DELETE FROM pools WHERE tenant=? AND id=?", (tenant, pid))

    @staticmethod
    def _pool(r: sqlite3.Row) -> Pool:
        return Pool(r["tenant"], r["id"], r["flake"], r["profile"], r["cpus"], r["mem"],
                    r["data_disk"], r["network"], r["current"], r["desired_running"],
                    r["desired_warm"], r["desired_sleeping"], r["created"])

    # -- revisions and builds ---------------------------------------------
    def add_revision(self, r: Revision) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO revisions VALUES (?,?,?,?,?,?)",
                       (r.tenant, r.pool, r.hash, r.out_path, json.dumps(r.manifest), r.created))

    def revisions(self, tenant: str, pid: str) -> list[Revision]:
        rows = self.db.execute(
            "SELECT * FROM revisions WHERE tenant=? AND pool=? ORDER BY created, hash", (tenant, pid))
        return [Revision(r["tenant"], r["pool"], r["hash"], r["out_path"], json.loads(r["manifest"]),
                         r["created"]) for r in rows]

    def remove_revision(self, tenant: str, pid: str, rev: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM revisions WHERE tenant=? AND pool=? AND hash=?", (tenant, pid, rev))

    def start_build(self, tenant: str, pid: str, log: str) -> int:
        with self.tx() as db:
            cur = db.execute("INSERT INTO builds (tenant,pool,started,status,log) VALUES (?,?,?,?,?)",
                             (tenant, pid, time.time(), "running", log))
        return int(cur.lastrowid or 0)

    def finish_build(self, build_id: int, status: str, revision: str | None = None,
                     cache_hit: bool = False, error: str | None = None) -> None:
        with self.tx() as db:
            db.execute("UPDATE builds SET finished=?, status=?, revision=?, cache_hit=?, error=?"
                       " WHERE id=?", (time.time(), status, revision, int(cache_hit), error, build_id))

    def builds(self, tenant: str, pid: str) -> list[dict[str, object]]:
        rows = self.db.execute("SELECT * FROM builds WHERE tenant=? AND pool=? ORDER BY id", (tenant, pid))
        return [dict(r) for r in rows]

    # -- instances -------------------------------------------------------
    def add_instance(self, i: Instance) -> None:
        now = time.time()
        try:
            with self.tx() as db:
                db.execute(
                    "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (i.id, i.tenant, i.pool, i.state.value, i.revision, i.host_index, i.ip, i.mac,
                     i.secrets_version, i.pid, now, now, i.error))
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

    def update_instance(self, iid: str, **fields: object) -> None:
        if "state" in fields and isinstance(fields["state"], State):
            fields["state"] = fields["state"].value
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as db:
            db.execute(f"UPDATE instances SET {cols}, updated=? WHERE id=?",
                       (*fields.values(), time.time(), iid))

    def remove_instance(self, iid: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM instances WHERE id=?", (iid,))

    @staticmethod
    def _instance(r: sqlite3.Row) -> Instance:
        return Instance(r["id"], r["tenant"], r["pool"], State(r["state"]), r["revision"],
                        r["host_index"], r["ip"], r["mac"], r["secrets_version"], r["pid"],
                        r["created"], r["updated"], r["error"])

    # -- events ----------------------------------------------------------
    def event(self, kind: str, message: str, tenant: str | None = None, pool: str | None = None,
              instance: str | None = None) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO events (ts,tenant,pool,instance,kind,message) VALUES (?,?,?,?,?,?)",
                       (time.time(), tenant, pool, instance, kind, message))

    def events(self, tenant: str | None = None, limit: int = 100) -> list[dict[str, object]]:
        if tenant:
            rows = self.db.execute("SELECT * FROM events WHERE tenant=? ORDER BY id DESC LIMIT ?", (tenant, limit))
        else:
            rows = self.db.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]


@contextlib.contextmanager
def lock(name: str, timeout: float = 600.0) -> Iterator[None]:
    """An exclusive host-wide lock (flock), e.g. one per pool, so two commands don't collide."""
    d = paths.locks_dir()
    d.mkdir(parents=True, exist_ok=True)
    f = open(d / f"{name}.lock", "a+")  # noqa: SIM115 - held for the context's lifetime
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Conflict(f"{name} is busy: another mvm command holds its lock",
                                   "wait for it to finish and retry") from None
                time.sleep(0.05)
        yield
    finally:
        f.close()


def pool_lock(tenant: str, pool: str, timeout: float = 600.0) -> contextlib.AbstractContextManager[None]:
    return lock(f"pool-{tenant}--{pool}", timeout)


def tenant_lock(tenant: str) -> contextlib.AbstractContextManager[None]:
    return lock(f"tenant-{tenant}")
