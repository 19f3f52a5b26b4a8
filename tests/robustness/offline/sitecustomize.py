"""Blocks the network for a whole process tree: put this folder first on ``PYTHONPATH``.

Every attempt to resolve a name or connect an internet socket raises ``OSError`` and is appended
to the file named by ``OLED_AD_NETWORK_LOG`` (when set), so a test can check that nothing even
tried. Local (AF_UNIX) sockets keep working: multiprocessing needs them.
"""

import os
import socket

_LOG = os.environ.get("OLED_AD_NETWORK_LOG")


def _refuse(what: str, detail: object) -> None:
    if _LOG:
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()} {what} {detail!r}\n")
    raise OSError(f"network access blocked by the offline test: {what} {detail!r}")


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _is_local(sock: socket.socket) -> bool:
    return getattr(socket, "AF_UNIX", None) is not None and sock.family == socket.AF_UNIX


def connect(self, address):
    if _is_local(self):
        return _connect(self, address)
    _refuse("connect", address)


def connect_ex(self, address):
    if _is_local(self):
        return _connect_ex(self, address)
    _refuse("connect", address)


def getaddrinfo(host, *args, **kwargs):
    _refuse("getaddrinfo", host)


def create_connection(address, *args, **kwargs):
    _refuse("create_connection", address)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.getaddrinfo = getaddrinfo
socket.create_connection = create_connection
socket.gethostbyname = lambda host: _refuse("gethostbyname", host)
