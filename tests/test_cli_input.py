"""Bad input gets one clear line, a non-zero exit, and no change of state."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Mvm, Result

ID_HINT = "(use lowercase letters, digits and '-', 1-63 characters, not starting or ending with '-')"


def state(mvm: Mvm) -> str:
    return mvm.ok("tenant", "list", "--json").out + mvm.ok("pool", "list", "--json").out


def refused(r: Result, rc: int, line: str) -> None:
    """The command failed with exit code rc, printed exactly `error: line` and nothing else."""
    assert (r.rc, r.lines, r.out) == (rc, [f"error: {line}"], ""), (r.rc, r.out, r.err)


@pytest.mark.parametrize("bad", ["Acme", "-x", "a/../b", "a" * 64, "-acme", "acme-", "a_b", ""])
def test_bad_tenant_ids_refused(mvm: Mvm, bad: str) -> None:
    before = state(mvm)
    r = mvm("tenant", "create", bad) if not bad.startswith("-") else mvm("tenant", "create", "--", bad)
    refused(r, 2, f"invalid tenant ID {bad!r} {ID_HINT}")
    assert state(mvm) == before
    assert not (mvm.home / "tenants").exists() or not any((mvm.home / "tenants").iterdir())


def test_option_like_id_is_one_line(mvm: Mvm) -> None:
    r = mvm("tenant", "create", "-x")
    refused(r, 2, "No such option '-x'. (see `mvm tenant create --help`)")


def test_tenant_create_list_info_and_duplicates(mvm: Mvm) -> None:
    r = mvm.ok("tenant", "create", "acme")
    assert "acme" in r.out
    tenants = json.loads(mvm.ok("tenant", "list", "--json").out)
    assert [t["id"] for t in tenants] == ["acme"]
    before = state(mvm)
    r = mvm("tenant", "create", "acme")
    refused(r, 4, "tenant 'acme' already exists (see `mvm tenant info acme`)")
    assert state(mvm) == before
    info = json.loads(mvm.ok("tenant", "info", "acme", "--json").out)
    assert info["quotas"]["max_vcpus"] == 16 and info["subnet"].endswith("/24")


def test_auto_allocated_networks_do_not_overlap(mvm: Mvm) -> None:
    for t in ("a", "b", "c"):
        mvm.ok("tenant", "create", t)
    ts = json.loads(mvm.ok("tenant", "list", "--json").out)
    assert len({t["subnet"] for t in ts}) == 3 and len({t["net_id"] for t in ts}) == 3


def test_overlapping_subnet_refused(mvm: Mvm) -> None:
    mvm.ok("tenant", "create", "a", "--subnet", "10.77.1.0/24")
    before = state(mvm)
    r = mvm("tenant", "create", "b", "--subnet", "10.77.1.0/24")
    refused(r, 4, "subnet 10.77.1.0/24 overlaps 10.77.1.0/24 of another tenant "
                  "(pick another /24, or omit --subnet to have one allocated)")
    r = mvm("tenant", "create", "b", "--net-id", "5000")
    refused(r, 2, "net-id 5000 is out of range (net-ids are 0–4095)")
    assert state(mvm) == before


def test_unknown_tenant_and_pool(mvm: Mvm) -> None:
    no_tenant = "no tenant 'nope' (see `mvm tenant list`, or create it with `mvm tenant create`)"
    refused(mvm("tenant", "info", "nope"), 3, no_tenant)
    refused(mvm("pool", "create", "nope/workers", "--profile", "minimal"), 3, no_tenant)
    mvm.ok("tenant", "create", "acme")
    before = state(mvm)
    refused(mvm("pool", "info", "acme/nope"), 3,
            "no pool acme/nope (see `mvm pool list acme`, or create it with `mvm pool create`)")
    refused(mvm("pool", "build", "acme/../b"), 2,
            "invalid pool address 'acme/../b' (write it as <tenant>/<pool>, e.g. acme/workers)")
    assert state(mvm) == before


def test_pool_shape_validated_before_anything(mvm: Mvm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mvm.ok("tenant", "create", "acme", "--max-vcpus", "4")
    before = state(mvm)
    missing = tmp_path / "missing"
    for args, rc, line in [
        (["--cpus", "0"], 2, "--cpus must be between 1 and 32 (got 0)"),
        (["--mem", "16"], 2, "--mem must be between 128 and 65536 MiB (got 16)"),
        (["--cpus", "8"], 5, "--cpus 8 exceeds tenant acme's vCPU quota (4)"),
        (["--data-disk", "-5"], 2, "--data-disk must not be negative (got -5)"),
        (["--flake", str(missing)], 2, f"no flake at '{missing}': {missing}/flake.nix does not "
                                       "exist (point --flake at a directory holding flake.nix)"),
    ]:
        r = mvm("pool", "create", "acme/workers", "--profile", "minimal", *args)
        refused(r, rc, line)
    assert state(mvm) == before
    assert not (mvm.home / "tenants/acme/pools").exists() or not any(
        (mvm.home / "tenants/acme/pools").iterdir())


def test_secrets_must_be_a_json_object_and_never_printed(mvm: Mvm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mvm.ok("tenant", "create", "acme")
    hint = '(secrets must be a JSON object, e.g. {"API_KEY": "..."})'
    f = tmp_path / "s.json"
    for content, why in (("[1, 2]", "holds a JSON list, not an object"),
                         ("not json", "is not valid JSON (JSONDecodeError)"),
                         ('"str"', "holds a JSON str, not an object")):
        f.write_text(content)
        r = mvm("tenant", "secrets", "set", "acme", "--from-file", str(f))
        refused(r, 2, f"{f} {why} {hint}")
    assert not (mvm.home / "tenants/acme/secrets.json").exists()
    f = tmp_path / "good.json"
    f.write_text('{"API_KEY": "hunter2-very-secret"}')
    r = mvm.ok("tenant", "secrets", "set", "acme", "--from-file", str(f))
    stored = mvm.home / "tenants/acme/secrets.json"
    assert json.loads(stored.read_text()) == {"API_KEY": "hunter2-very-secret"}
    assert stored.stat().st_mode & 0o777 == 0o600
    outputs = [r.out + r.err]
    for args in (("tenant", "info", "acme"), ("tenant", "info", "acme", "--json"),
                 ("tenant", "list", "--json"), ("tenant", "secrets", "rotate", "acme")):
        res = mvm.ok(*args)
        outputs.append(res.out + res.err)
    assert all("hunter2" not in o for o in outputs)
    assert "API_KEY" in outputs[1]


def test_config_settings(mvm: Mvm) -> None:
    mvm.ok("config", "set", "accel", "tcg")
    assert mvm.ok("config", "get", "accel").out.strip() == "tcg"
    r = mvm("config", "set", "nope", "1")
    refused(r, 2, "unknown setting 'nope' (known: nixpkgs, accel, backend, jail, jail-uid-base, builder, mem-reserve)")
    assert mvm.ok("config", "get", "accel").out.strip() == "tcg"


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e300", "0", "86401"])
def test_exec_timeout_out_of_range_is_one_line(mvm: Mvm, value: str) -> None:
    r = mvm("instance", "exec", "acme/w/i-12345678", "--timeout", value, "--", "true")
    refused(r, 125, f"--timeout must be more than 0 and at most 86400 seconds (got {float(value):g}) "
                  "(give the seconds the command may run)")


def test_exec_output_limit_is_a_size_within_range(mvm: Mvm) -> None:
    r = mvm("instance", "exec", "acme/w/i-12345678", "--max-output", "lots", "--", "true")
    refused(r, 125, "Invalid value for '--max-output': 'lots' is not a size: give bytes, or a number "
                  "with K, M or G (see `mvm instance exec --help`)")
    r = mvm("instance", "exec", "acme/w/i-12345678", "--max-output", "1G", "--", "true")
    refused(r, 125, f"--max-output must be between 0 and {256 << 20} bytes (got {1 << 30}) "
                  "(give the bytes of stdout (and of stderr) to keep, e.g. 16M)")


@pytest.mark.parametrize(("seam", "says"), [
    ("fake:/tmp/ledger", "MVM_TEST_RUNTIME='fake:/tmp/ledger' is not <module>:<factory>[:<argument>]"),
    ("no_such_module:Factory", "MVM_TEST_RUNTIME='no_such_module:Factory': No module named 'no_such_module'"),
    ("json:NoSuch", "MVM_TEST_RUNTIME='json:NoSuch': module 'json' has no attribute 'NoSuch'"),
])
def test_a_malformed_runtime_seam_is_refused_in_one_line(mvm: Mvm, seam: str, says: str) -> None:
    """MVM_TEST_RUNTIME (a test seam: `<module>:<factory>[:<argument>]`) that names no factory
    refuses every command that composes the host context, before it changes anything."""
    before = state(mvm)
    mvm.env["MVM_TEST_RUNTIME"] = seam
    r = mvm("tenant", "create", "acme")
    del mvm.env["MVM_TEST_RUNTIME"]
    refused(r, 2, f"{says} (unset MVM_TEST_RUNTIME (it is a test seam))")
    assert state(mvm) == before
