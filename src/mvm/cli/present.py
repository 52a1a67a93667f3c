"""How commands print their results, from plain data (`services.views`' shapes): the same
functions print what a command found acting directly and what the agent's API answered
(`--agent`), so both print the same."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mvm.cli import output
from mvm.cli.output import emit_json, table


def show(info: Mapping[str, Any], json_: bool) -> None:
    """One object: JSON, or `key: value` lines."""
    if json_:
        emit_json(info)
        return
    for k, v in output.to_jsonable(info).items():
        print(f"{k}: {v}")


def tenant_list(tenants: Sequence[Mapping[str, Any]], pools_per_tenant: Mapping[str, int], json_: bool) -> None:
    if json_:
        emit_json(tenants)
        return
    table(["tenant", "net-id", "subnet", "pools"],
          [(t["id"], t["net_id"], t["subnet"], pools_per_tenant.get(t["id"], 0)) for t in tenants])


def pool_list(pools: Sequence[Mapping[str, Any]], instances_per_pool: Mapping[str, int], json_: bool) -> None:
    if json_:
        emit_json(pools)
        return
    table(["pool", "profile", "cpus", "mem", "data-disk", "current", "instances"],
          [(f"{p['tenant']}/{p['id']}", p["profile"], p["cpus"], p["mem"], p["data_disk"] or "-",
            p["current"] or "-", instances_per_pool.get(f"{p['tenant']}/{p['id']}", 0)) for p in pools])


def revisions(revs: Sequence[Mapping[str, Any]], json_: bool) -> None:
    if json_:
        emit_json(revs)
        return
    table(["", "revision", "built", "closure", "in use"],
          [("*" if r["current"] else "", r["revision"],
            dt.datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M:%S"),
            f"{int(r['manifest'].get('closure_size', 0)) // 2**20} MiB",
            "yes" if r["in_use"] else "") for r in revs])


def built(ref: str, revision: str, cached: bool) -> None:
    print(f"{ref}: revision {revision} is current" + (" (no change, cache hit)" if cached else ""))


def rolled_back(ref: str, target: str) -> None:
    print(f"{ref}: current is now {target}; new instances boot it, running ones keep theirs until restarted")


def scaled(ref: str, instances: Sequence[Mapping[str, Any]], json_: bool) -> None:
    if json_:
        emit_json(instances)
        return
    counts = {s: sum(1 for i in instances if i["state"] == s) for s in ("running", "warm", "sleeping")}
    print(f"{ref}: running={counts['running']} warm={counts['warm']} sleeping={counts['sleeping']}")


def instance_list(items: Sequence[Mapping[str, Any]], json_: bool) -> None:
    if json_:
        emit_json(items)
        return
    table(["instance", "state", "revision", "ip", "observed"],
          [(i["address"], i["state"], i["revision"] or "-", i["ip"] or "-", i.get("observed") or i["error"] or "")
           for i in items])


def transitioned(address: str, state: str) -> None:
    print(f"{address}: {state}")


def exec_result(exit_code: int, timed_out: bool, stdout: bytes, stderr: bytes, truncated: Mapping[str, int],
                timeout: float, json_: bool) -> None:
    if json_:
        emit_json({"exit_code": exit_code, "started": True, "timed_out": timed_out,
                   "stdout": stdout.decode(errors="replace"),
                   "stderr": stderr.decode(errors="replace"), "truncated": dict(truncated)})
    else:
        sys.stdout.buffer.write(stdout)
        sys.stdout.buffer.flush()
        sys.stderr.buffer.write(stderr)
        sys.stderr.buffer.flush()
    kept = {"stdout": len(stdout), "stderr": len(stderr)}
    for stream, written in truncated.items():
        output.note(f"warning: {stream} cut at {kept.get(stream, 0)} bytes of the {written} "
                    "the command wrote (--max-output keeps more)")
    if timed_out:
        output.error(f"command timed out after {timeout:g}s")
