"""What the two DDP tests share: free ports for the process groups and a record of the files a rank writes."""

from __future__ import annotations

import socket
from types import ModuleType


def free_ports(n: int) -> tuple[int, ...]:
    """``n`` distinct free ports (the sockets stay open until all are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()


def record_writes(*modules: ModuleType) -> list[str]:
    """Patch ``atomic_write`` in ``encoders.core.serialization`` and ``modules`` (which imported it by name) and
    ``MetricsLog.write``, so that every file this process writes is appended to the returned list."""
    import encoders.core.runtime
    import encoders.core.serialization

    writes: list[str] = []
    atomic = encoders.core.serialization.atomic_write

    def spy_atomic(path, write):
        writes.append(str(path))
        return atomic(path, write)

    for module in (encoders.core.serialization, *modules):
        module.atomic_write = spy_atomic
    log_write = encoders.core.runtime.MetricsLog.write

    def spy_log(self, **rec):
        if self.enabled:
            writes.append(str(self.path))
        return log_write(self, **rec)

    encoders.core.runtime.MetricsLog.write = spy_log
    return writes
