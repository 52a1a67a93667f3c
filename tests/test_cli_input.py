"""Bad input gets one clear line, a non-zero exit, and no change of state."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Mvm


def state(mvm: Mvm) -> str:
    return mvm.ok("tenant", "list", "--json").out + mvm.ok("pool", "list", "--json").out


@pytest.mark.parametrize("bad", ["Acme", "-x", "a/../b", "a" * 64, "-acme", "acme-", "a_b", ""])
def test_bad_tenant_ids_refused(mvm: Mvm, bad: str) -> None:
    before = state(mvm)
    r = mvm("tenant", "create", bad) if not bad.startswith("-") else mvm("tenant", "create", "--", bad)
    assert r.rc != 0
    assert len(r.lines) == 1, r.err
    assert "invalid tenant ID" in r.err or "tenant" in r.err
    assert state(mvm) == before


def test_option_like_id_is_one_line(mvm: Mvm) -> None:
    r = mvm("tenant", "create", "-x")
    assert r.rc == 2 and len(r.lines) == 1 and "-x" in r.err


def test_tenant_create_list_info_and_duplicates(mvm: Mvm) -> None:
    r = mvm.ok("tenant", "create", "acme")
    assert "acme" in r.out
    tenants = json.loads(mvm.ok("tenant", "list", "--json").out)
    assert [t["id"] for t in tenants] == ["acme"]
    before = state(mvm)
    r = mvm("tenant", "create", "acme")
    assert r.rc != 0 and len(r.lines) == 1 and "already exists" in r.err
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
    assert r.rc != 0 and len(r.lines) == 1 and "overlap" in r.err
    r = mvm("tenant", "create", "b", "--net-id", "5000")
    assert r.rc != 0 and len(r.lines) == 1
    assert state(mvm) == before


def test_unknown_tenant_and_pool(mvm: Mvm) -> None:
    r = mvm("tenant", "info", "nope")
    assert r.rc != 0 and len(r.lines) == 1 and "no tenant" in r.err
    r = mvm("pool", "create", "nope/workers", "--profile", "minimal")
    assert r.rc != 0 and len(r.lines) == 1 and "no tenant" in r.err
    mvm.ok("tenant", "create", "acme")
    r = mvm("pool", "info", "acme/nope")
    assert r.rc != 0 and len(r.lines) == 1 and "no pool" in r.err
    r = mvm("pool", "build", "acme/../b")
    assert r.rc != 0 and len(r.lines) == 1


def test_pool_shape_validated_before_anything(mvm: Mvm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mvm.ok("tenant", "create", "acme", "--max-vcpus", "4")
    before = state(mvm)
    for args, words in [
        (["--cpus", "0"], "--cpus"),
        (["--mem", "16"], "--mem"),
        (["--cpus", "8"], "quota"),
        (["--data-disk", "-5"], "--data-disk"),
        (["--flake", str(tmp_path / "missing")], "no flake"),
    ]:
        r = mvm("pool", "create", "acme/workers", "--profile", "minimal", *args)
        assert r.rc != 0, args
        assert len(r.lines) == 1, r.err
        assert words in r.err, r.err
    assert state(mvm) == before


def test_secrets_must_be_a_json_object_and_never_printed(mvm: Mvm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mvm.ok("tenant", "create", "acme")
    for content in ("[1, 2]", "not json", '"str"'):
        f = tmp_path / "s.json"
        f.write_text(content)
        r = mvm("tenant", "secrets", "set", "acme", "--from-file", str(f))
        assert r.rc != 0 and len(r.lines) == 1, r.err
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
    assert r.rc != 0 and len(r.lines) == 1 and "unknown setting" in r.err
