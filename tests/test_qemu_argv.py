"""The QEMU command line, as a pure function of the VM spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvm.errors import InvalidInput
from mvm.runtime.base import Disk, NetIf, VmSpec
from mvm.runtime.qemu import QemuRuntime, argv, kernel_cmdline, qemu_message


def spec(**changes: object) -> VmSpec:
    base: dict[str, object] = dict(
        name="i-1a2b3c4d", vcpus=2, mem_mib=384, kernel=Path("/k/vmlinux"),
        initrd=Path("/k/initrd"), cmdline="root=/dev/vda ro mvm.hostname=i-1a2b3c4d",
        disks=(Disk("rootfs", Path("/r/rootfs.ext4"), True),
               Disk("data", Path("/i/data.ext4"), False),
               Disk("secrets", Path("/dev/shm/s.img"), True)),
        net=NetIf("mvm-t1-3", "52:54:00:00:01:03"), run_dir=Path("/i/run"))
    base.update(changes)
    return VmSpec(**base)  # type: ignore[arg-type]


def value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_machine_accel_cpu_memory() -> None:
    a = argv(spec(), "tcg", tsc_khz=2596122)
    assert a[0] == "qemu-system-x86_64"
    assert value(a, "-M") == "microvm"  # ACPI left at its default (on): devices are found by it
    assert value(a, "-accel").startswith("tcg")
    assert value(a, "-cpu") == "qemu64,+arat"
    assert (value(a, "-m"), value(a, "-smp")) == ("384M", "2")
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot", "-daemonize"):
        assert flag in a
    assert value(a, "-display") == "none"
    k = argv(spec(), "kvm")
    assert (value(k, "-accel"), value(k, "-cpu")) == ("kvm", "host")


def test_tcg_translation_cache_is_capped_only_when_asked() -> None:
    assert value(argv(spec(), "tcg", tb_size_mib=16), "-accel") == "tcg,tb-size=16"
    assert value(argv(spec(), "tcg", tb_size_mib=None), "-accel") == "tcg"


def test_kernel_initrd_and_command_line() -> None:
    a = argv(spec(), "tcg", tsc_khz=2596122)
    assert (value(a, "-kernel"), value(a, "-initrd")) == ("/k/vmlinux", "/k/initrd")
    line = value(a, "-append")
    assert line.startswith("console=ttyS0,115200 ")
    assert line.count("console=") == 1
    assert "tsc_early_khz=2596122" in line.split()
    assert line.endswith("root=/dev/vda ro mvm.hostname=i-1a2b3c4d")  # the guest's own last
    assert "-initrd" not in argv(spec(initrd=None), "tcg")
    assert "tsc_early_khz" not in kernel_cmdline("x=1", None)


def test_disks_in_order_with_readonly_flags() -> None:
    a = argv(spec(), "tcg")
    drives = values(a, "-drive")
    assert drives == [
        "file=/r/rootfs.ext4,if=none,id=disk-rootfs,format=raw,readonly=on,cache=writeback",
        "file=/i/data.ext4,if=none,id=disk-data,format=raw,readonly=off,cache=writeback",
        "file=/dev/shm/s.img,if=none,id=disk-secrets,format=raw,readonly=on,cache=writeback",
    ]


def test_device_order_disks_then_agent_then_net() -> None:
    devices = values(argv(spec(), "tcg"), "-device")
    assert devices == [
        "virtio-blk-device,drive=disk-rootfs",
        "virtio-blk-device,drive=disk-data",
        "virtio-blk-device,drive=disk-secrets",
        "virtio-serial-device",
        "virtserialport,chardev=agent,name=mvm.agent",
        "virtio-net-device,netdev=net0,mac=52:54:00:00:01:03",
    ]
    assert values(argv(spec(net=None), "tcg"), "-device") == devices[:-1]


def test_sockets_console_pidfile_in_run_dir() -> None:
    a = argv(spec(), "tcg")
    chardevs = values(a, "-chardev")
    assert "socket,id=agent,path=/i/run/agent.sock,server=on,wait=off" in chardevs
    assert "socket,id=qmp,path=/i/run/qmp.sock,server=on,wait=off" in chardevs
    assert "file,id=console,path=/i/run/console.pipe,append=on" in chardevs
    assert value(a, "-serial") == "chardev:console"
    assert value(a, "-mon") == "chardev=qmp,mode=control"
    assert value(a, "-pidfile") == "/i/run/qemu.pid"
    assert value(a, "-netdev") == "tap,id=net0,ifname=mvm-t1-3,script=no,downscript=no"


def test_incoming_only_appends() -> None:
    cold = argv(spec(), "tcg", tsc_khz=1)
    warm = argv(spec(), "tcg", incoming=True, tsc_khz=1)
    assert warm[:len(cold)] == cold  # identical devices in identical order
    assert warm[len(cold):] == ["-incoming", "defer", "-S"]
    assert "-incoming" not in cold


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # QEMU chdirs to / when it daemonizes
    a = argv(spec(kernel=Path("k"), run_dir=Path("run"),
                  disks=(Disk("rootfs", Path("r.img"), True),)), "tcg")
    assert value(a, "-kernel") == f"{tmp_path}/k"
    assert value(a, "-pidfile") == f"{tmp_path}/run/qemu.pid"
    assert values(a, "-drive")[0].startswith(f"file={tmp_path}/r.img,")


def test_commas_in_paths_are_escaped() -> None:
    a = argv(spec(disks=(Disk("rootfs", Path("/a,b/root.img"), True),),
                  run_dir=Path("/x,y")), "tcg")
    assert values(a, "-drive")[0].startswith("file=/a,,b/root.img,if=none")
    assert "socket,id=qmp,path=/x,,y/qmp.sock,server=on,wait=off" in values(a, "-chardev")


def test_refuses_what_qemu_would_refuse_later() -> None:
    with pytest.raises(InvalidInput, match="device id"):
        argv(spec(disks=(Disk("bad id", Path("/x"), True),)), "tcg")
    many = tuple(Disk(f"d{n}", Path(f"/d{n}"), True) for n in range(7))
    with pytest.raises(InvalidInput, match="virtio-mmio"):
        argv(spec(disks=many), "tcg")
    fits = argv(spec(disks=many[:6]), "tcg")  # 6 disks + agent + net = 8 slots
    assert [d.split(",")[0] for d in values(fits, "-device")] == [
        *["virtio-blk-device"] * 6, "virtio-serial-device", "virtserialport", "virtio-net-device"]
    with pytest.raises(InvalidInput, match="accelerator"):
        argv(spec(), "hvf")


#: The whole command line for spec() under TCG: every flag, every value, in order.
BOOT_TCG = [
    "qemu-system-x86_64",
    "-name", "i-1a2b3c4d",
    "-M", "microvm",
    "-accel", "tcg,tb-size=64",
    "-cpu", "qemu64,+arat",
    "-m", "384M",
    "-smp", "2",
    "-nodefaults", "-no-user-config", "-display", "none",
    "-no-reboot",
    "-kernel", "/k/vmlinux",
    "-initrd", "/k/initrd",
    "-append", "console=ttyS0,115200 quiet panic=-1 reboot=t pci=off cryptomgr.notests "
               "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1 "
               "init_on_alloc=0 random.trust_cpu=on tsc_early_khz=5 "
               "root=/dev/vda ro mvm.hostname=i-1a2b3c4d",
    "-drive", "file=/r/rootfs.ext4,if=none,id=disk-rootfs,format=raw,readonly=on,cache=writeback",
    "-device", "virtio-blk-device,drive=disk-rootfs",
    "-drive", "file=/i/data.ext4,if=none,id=disk-data,format=raw,readonly=off,cache=writeback",
    "-device", "virtio-blk-device,drive=disk-data",
    "-drive", "file=/dev/shm/s.img,if=none,id=disk-secrets,format=raw,readonly=on,cache=writeback",
    "-device", "virtio-blk-device,drive=disk-secrets",
    "-device", "virtio-serial-device",
    "-chardev", "socket,id=agent,path=/i/run/agent.sock,server=on,wait=off",
    "-device", "virtserialport,chardev=agent,name=mvm.agent",
    "-netdev", "tap,id=net0,ifname=mvm-t1-3,script=no,downscript=no",
    "-device", "virtio-net-device,netdev=net0,mac=52:54:00:00:01:03",
    "-chardev", "file,id=console,path=/i/run/console.pipe,append=on",
    "-serial", "chardev:console",
    "-chardev", "socket,id=qmp,path=/i/run/qmp.sock,server=on,wait=off",
    "-mon", "chardev=qmp,mode=control",
    "-D", "/i/run/qemu.log",
    "-pidfile", "/i/run/qemu.pid",
    "-daemonize",
]


def test_complete_boot_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing but the spec and the arguments shapes it: not the working directory, not the
    # time, not a random id (a restore must rebuild exactly the same machine).
    assert argv(spec(), "tcg", tsc_khz=5) == BOOT_TCG
    monkeypatch.chdir(tmp_path)
    assert argv(spec(), "tcg", tsc_khz=5) == BOOT_TCG


def test_complete_restore_command_line() -> None:
    # Restore = the boot line unchanged (same kernel, same devices in the same virtio-mmio
    # slots), then wait for the migration stream with the vCPUs stopped.
    assert argv(spec(), "tcg", incoming=True, tsc_khz=5) == [*BOOT_TCG, "-incoming", "defer", "-S"]


def test_restore_uses_the_snapshots_accelerator() -> None:
    # QemuRuntime.restore passes the accel recorded in the snapshot, which wins over its own.
    line = QemuRuntime("kvm").argv(spec(), "tcg", incoming=True)
    assert (value(line, "-accel"), value(line, "-cpu")) == ("tcg,tb-size=64", "qemu64,+arat")
    assert line[-3:] == ["-incoming", "defer", "-S"]
    line = QemuRuntime("tcg").argv(spec())
    assert value(line, "-accel") == "tcg,tb-size=64" and "-incoming" not in line


def test_qemu_message_picks_the_error_line() -> None:
    assert qemu_message("qemu-system-x86_64: -drive file=/x: Could not open '/x': No such file"
                        ) == "-drive file=/x: Could not open '/x': No such file"
    assert qemu_message("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
                        "qemu-system-x86_64: kvm.c:3183: Assertion failed.") == (
        "failed to set MSR 0x10a to 0x69")
    assert qemu_message("qemu-system-x86_64: warning: w\nreal problem") == "real problem"
    assert qemu_message("qemu-system-x86_64: -drive x: Failed to get \"write\" lock\n"
                        "Is another process using the image [x]?") == (
        "-drive x: Failed to get \"write\" lock; Is another process using the image [x]?")
    assert qemu_message("") == ""


def test_devices_list_matches_device_order() -> None:
    assert spec().devices() == ("blk:rootfs:ro", "blk:data:rw", "blk:secrets:ro", "agent",
                                "net:52:54:00:00:01:03")
