"""The per-instance console logger (see `mvm.runtime.console`): a script of its own, run as
`python -I -S console_logger.py <log> <cap>` with the console FIFO's read end on stdin.

Standard library only and no mvm import (~3 MB per instance). It appends to <log> and, when
<log> reaches <cap> bytes, moves it to <log>.1 and starts a new one; it ends at EOF, which the
FIFO reads once the hypervisor is gone. What it cannot write (a full disk) is dropped: the
guest never waits for its console. It reads in batches: a TCG serial port writes one byte
per write(2), and reading each at once would keep a host CPU busy.
"""

import os
import sys
import time

BATCH_BYTES = 16384
BATCH_WAIT = 0.02


def _open(log: str) -> int:
    return os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def _write_all(fd: int, data: memoryview) -> None:
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError:
        pass  # dropped, see above


def _move(log: str, old: str) -> bool:
    try:
        os.replace(log, old)
    except OSError:
        return False  # (gone: a new one is started all the same)
    return True


def main(log: str, cap: int) -> None:
    old = log + ".1"
    fd = _open(log)
    size = os.fstat(fd).st_size
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return
        data = memoryview(chunk)
        while data:
            if size >= cap:
                os.close(fd)
                _move(log, old)
                fd = _open(log)
                size = os.fstat(fd).st_size
            part = data[:max(cap - size, 0)]
            _write_all(fd, part)
            size += len(part)
            data = data[len(part):]
        if len(chunk) < BATCH_BYTES:
            time.sleep(BATCH_WAIT)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
