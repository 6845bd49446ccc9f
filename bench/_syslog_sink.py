"""The login benchmark's syslog sink: a /dev/log-style listener that timestamps every line.

    python -m bench._syslog_sink SOCKET LOG     (bench/_sshbench.py's SyslogSink starts it)

Binds the datagram socket SOCKET (mode 0666), prints "ready", then appends every datagram to
LOG as "<epoch seconds, microseconds> <message>", until it is killed.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def main(path: str, out: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    os.chmod(path, 0o666)
    print("ready", flush=True)
    with open(out, "a", buffering=1) as f:
        while True:
            text = s.recv(65536).decode("utf-8", "replace").rstrip("\n")
            f.write(f"{time.time():.6f} {text}\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
