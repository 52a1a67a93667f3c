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

#: Fields that hold a time as seconds since the epoch: shown as local time.
TIME_KEYS = frozenset({"created", "started", "finished", "updated", "ts"})


def when(ts: float) -> str:
    """`2026-12-08 14:03:09`: local time, to the second (not "5 min ago": what a command prints
    does not change with the moment it is asked)."""
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float) -> str:
    """A duration as `pool create` takes it: 30s, 5m, 1h."""
    for unit, secs in (("h", 3600), ("m", 60)):
        if value >= secs and value % secs == 0:
            return f"{int(value // secs)}{unit}"
    return f"{value:g}s"


def _scalar(key: str, v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if key in TIME_KEYS and isinstance(v, int | float) and v > 0:
        return when(v)
    return str(v)


def _lines(key: str, v: Any, indent: str) -> list[str]:
    """`key: value`, with what is nested in it on lines of their own, indented."""
    if isinstance(v, Mapping):
        if not v:
            return [f"{indent}{key}: -"]
        return [f"{indent}{key}:", *(ln for k, x in v.items() for ln in _lines(str(k), x, indent + "  "))]
    if isinstance(v, list | tuple):
        if not v:
            return [f"{indent}{key}: -"]
        if all(not isinstance(x, Mapping | list | tuple) for x in v):
            return [f"{indent}{key}: " + ", ".join(_scalar(key, x) for x in v)]
        out = [f"{indent}{key}:"]
        for x in v:
            item = _lines("-", x, indent + "  ") if not isinstance(x, Mapping) else \
                [ln for k, y in x.items() for ln in _lines(str(k), y, indent + "    ")]
            if isinstance(x, Mapping) and item:
                item[0] = f"{indent}  - {item[0].lstrip()}"
            out += item
        return out
    text = _scalar(key, v)
    first, *rest = text.splitlines() or [""]
    return [f"{indent}{key}: {first}", *(f"{indent}  {ln}" for ln in rest)]


def show(info: Mapping[str, Any], json_: bool) -> None:
    """One object: JSON, or `key: value` lines, nested values indented below their key, times
    as local time."""
    if json_:
        emit_json(info)
        return
    for k, v in output.to_jsonable(info).items():
        for line in _lines(k, v, ""):
            print(line)


def pool_info(info: Mapping[str, Any], json_: bool) -> None:
    """`pool info`: the pool's settings, then one line per recent build and per instance."""
    if json_:
        emit_json(info)
        return
    p = output.to_jsonable(info)
    if p.get("pinned"):
        policy = "pinned (the idle policy never moves its instances)"
    elif p.get("idle_warm") is None and p.get("idle_sleep") is None:
        policy = "none"
    else:
        policy = ", ".join(
            [f"warm after {seconds(p['idle_warm'])} idle"] * (p.get("idle_warm") is not None)
            + [f"sleep after {seconds(p['idle_sleep'])} idle"] * (p.get("idle_sleep") is not None)
            + [f"at least {p.get('min_running', 0)} running"])
    show({
        "pool": f"{p['tenant']}/{p['id']}", "flake": p["flake"], "profile": p["profile"],
        "backend": p.get("backend") or "the host's (setting backend)",
        "cpus": p["cpus"], "mem": f"{p['mem']} MiB",
        "data disk": f"{p['data_disk']} MiB" if p.get("data_disk") else "none", "network": p["network"],
        "current": p.get("current"), "revisions": p.get("revisions"),
        "desired": (f"running={p.get('desired_running', 0)} warm={p.get('desired_warm', 0)} "
                    f"sleeping={p.get('desired_sleeping', 0)}"),
        "idle policy": policy, "created": p.get("created"),
    }, False)
    builds = p.get("builds") or []
    print("builds:" + ("" if builds else " -"))
    for b in builds:
        print("  " + _build_line(b))
        for what in ("error", "log"):
            if b.get(what):
                lines = str(b[what]).splitlines()
                print(f"    {what}: {lines[0]}")
                for ln in lines[1:]:
                    print(f"      {ln}")
    insts = p.get("instances") or []
    print("instances:" + ("" if insts else " -"))
    for i in insts:
        print(f"  {i['id']}  {i['state']}  revision {i.get('revision') or '-'}")


def _build_line(b: Mapping[str, Any]) -> str:
    """`#3 succeeded 2026-12-08 14:03:09, took 31.2s, builder vm: revision ab12…`."""
    line = f"#{b.get('id')} {b.get('status')}"
    if b.get("started"):
        line += f" {when(b['started'])}"
    if b.get("started") and b.get("finished"):
        line += f", took {b['finished'] - b['started']:.1f}s"
    if b.get("builder"):
        line += f", builder {b['builder']}"
    if b.get("revision"):
        line += f": revision {b['revision']}" + (" (no change, cache hit)" if b.get("cache_hit") else "")
    return line


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
            when(r["created"]),
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
