"""The KVM probe: a timed tiny guest, cached per host boot; and the accel setting."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mvm.errors import HostUnsupported, InvalidInput
from mvm.runtime import accel
from mvm.runtime.accel import AccelProbe, choose_accel, probe_image, probe_kvm

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")


def test_probe_image_is_a_64k_bios_with_a_reset_vector() -> None:
    img = probe_image()
    assert len(img) == 0x10000
    assert img[0xFFF0:0xFFF2] == bytes.fromhex("EBCE")  # jmp short back to the loop
    assert img[0xFFC0:0xFFC2] == bytes.fromhex("66B9")  # mov ecx, imm32


@needs_qemu
def test_tiny_guest_runs_and_exits_under_tcg() -> None:
    # The same payload under TCG proves the probe itself works on any host.
    r = probe_kvm(timeout=10, accel="tcg", cpu="qemu64")
    assert r.usable and r.fast, r
    assert r.seconds is not None and r.seconds < 5


@needs_qemu
def test_a_guest_past_its_deadline_is_killed_and_reported_slow() -> None:
    r = probe_kvm(timeout=0.001, accel="tcg", cpu="qemu64")
    assert (r.usable, r.fast, r.seconds) == (True, False, None)
    assert "did not finish" in r.reason


def test_missing_device_is_not_usable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(accel, "KVM_DEVICE", tmp_path / "kvm")
    r = probe_kvm()
    assert not r.usable and not r.fast and "does not exist" in r.reason


def test_result_is_cached_per_boot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    def fake(timeout: float, binary: str, accel_: str, cpu: str) -> AccelProbe:
        calls.append(1)
        return AccelProbe(True, False, None, "slow")

    monkeypatch.setattr(accel, "_probe", fake)
    cache = tmp_path / "state" / "kvm-probe.json"
    assert probe_kvm(cache=cache) == AccelProbe(True, False, None, "slow")
    assert probe_kvm(cache=cache) == AccelProbe(True, False, None, "slow")
    assert len(calls) == 1
    monkeypatch.setattr(accel, "_boot_id", lambda: "another-boot")
    probe_kvm(cache=cache)
    assert len(calls) == 2
    cache.write_text("{not json")
    probe_kvm(cache=cache)  # a broken cache is re-probed, not fatal
    assert len(calls) == 3


def test_choose_accel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert choose_accel("tcg") == "tcg"
    monkeypatch.setattr(accel, "probe_kvm", lambda *a, **k: AccelProbe(True, False, None, "slow"))
    assert choose_accel("auto") == "tcg"
    monkeypatch.setattr(accel, "probe_kvm", lambda *a, **k: AccelProbe(True, True, 0.05, "ok"))
    assert choose_accel("auto") == "kvm"
    with pytest.raises(InvalidInput):
        choose_accel("fast")
    monkeypatch.setattr(accel, "KVM_DEVICE", tmp_path / "kvm")
    with pytest.raises(HostUnsupported, match="accel is set to kvm"):
        choose_accel("kvm")
