"""Ray addresses: their form (:func:`parse_ray_address`) and whether a Ray head answers there (:func:`reach_ray`).

:func:`reach_ray` resolves a Ray cluster's host, opens a TCP connection and
checks that a gRPC server answers, and raises :class:`ClusterUnreachable`
(exit status 1, like an unreachable tracking server) within seconds, where Ray
itself would retry for minutes. :func:`r2sweep.tune.cluster.connect` calls it
before joining; the CLI checks an ``--address`` with :func:`parse_ray_address`
(:func:`r2sweep.api.options.ray_address`). Ray is not imported at module level.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import threading
from dataclasses import dataclass

from r2sweep.core.errors import R2SweepError
from r2sweep.core.option_errors import OptionError, _shown

__all__ = ["ClusterUnreachable", "RayAddress", "parse_ray_address", "reach_ray"]

#: Seconds to resolve a Ray host, and to connect to one of its addresses or hear from it.
#: At most two addresses are tried, so a probe ends within about 13 s.
RESOLVE_TIMEOUT_S = 4.0
CONNECT_TIMEOUT_S = 3.0

_RAY_FORMS = "HOST:6379 (the head's GCS port), ray://HOST:10001 (its Ray Client port) or auto"


class ClusterUnreachable(R2SweepError, ConnectionError):
    """Nothing answers at a Ray cluster's address (not bad input: exit status 1)."""


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?$")


@dataclass(frozen=True)
class RayAddress:
    """A parsed Ray address: ``kind`` is ``auto``, ``local``, ``gcs`` (HOST:PORT) or ``client`` (ray://)."""

    text: str
    kind: str
    host: str = ""
    port: int = 0

    @property
    def fix(self) -> str:
        if self.kind == "client":
            return ("is the head running with its Ray Client server (ray start --head starts it on port 10001)? "
                    "ray://HOST:PORT names the Ray Client port (10001 by default); HOST:6379 is the GCS port")
        return ("is the head running (ray start --head)? HOST:PORT names the head's GCS port (6379 by default); "
                "ray://HOST:10001 is its Ray Client port")


def parse_ray_address(value: str, option: str = "address") -> RayAddress:
    """The form of a Ray address (nothing is resolved or contacted).

    Accepted: ``auto``, ``local``, ``HOST:PORT`` and ``ray://HOST[:PORT]`` (port
    10001 by default), HOST a host name, an IPv4 address or ``[IPv6]``, PORT 1-65535.
    """
    text = value.strip()
    if not text:
        raise OptionError(option, value, f"an empty address; give {_RAY_FORMS}, or leave it out for a local Ray")
    if text in ("auto", "local"):
        return RayAddress(text, text)
    kind, rest, default_port = "gcs", text, None
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme.lower() in ("http", "https"):
            raise OptionError(option, value, "a web address (the dashboard's or the job server's), which Ray cannot "
                              f"join; give {_RAY_FORMS}")
        if scheme != "ray":
            raise OptionError(option, value, f"{scheme}:// is not a Ray address; give {_RAY_FORMS}")
        kind, default_port = "client", 10001
    if "/" in rest.rstrip("/") or "@" in rest:
        raise OptionError(option, value, f"a Ray address has no path or user; give {_RAY_FORMS}")
    rest = rest.rstrip("/")
    match = re.fullmatch(r"\[(?P<v6>[^\]]*)\](?::(?P<p6>[^:]*))?|(?P<host>[^:]*)(?::(?P<port>[^:]*))?", rest)
    if match is None:
        raise OptionError(option, value, f"not HOST:PORT (an IPv6 address goes in brackets: [::1]:6379); give {_RAY_FORMS}")
    host = match["v6"] if match["v6"] is not None else match["host"]
    port_text = match["p6"] if match["v6"] is not None else match["port"]
    if not host:
        raise OptionError(option, value, f"names no host; give {_RAY_FORMS}")
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise OptionError(option, value, f"[{host}] is not an IPv6 address; give {_RAY_FORMS}") from None
    elif not _HOSTNAME.match(host):
        raise OptionError(option, value, f"{_shown(host)} is not a host name or IP address; give {_RAY_FORMS}")
    if port_text is None or port_text == "":
        if default_port is None:
            raise OptionError(option, value, f"names no port; give HOST:PORT, e.g. {host}:6379 (the head's GCS port)")
        port = default_port
    else:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise OptionError(option, value, f"the port {_shown(port_text)} is not a number from 1 to 65535; "
                              f"e.g. {'ray://' if kind == 'client' else ''}{host}:{10001 if kind == 'client' else 6379}")
        port = int(port_text)
    return RayAddress(text, kind, host, port)


def _resolve(host: str, port: int) -> list[tuple]:
    """getaddrinfo with a time limit (it has none of its own); TimeoutError past it.

    In a daemon thread, so that a resolver that never answers cannot hold the process at exit.
    """
    outcome: list = []

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as error:
            outcome.append(error)

    thread = threading.Thread(target=lookup, name="r2sweep-resolve", daemon=True)
    thread.start()
    thread.join(RESOLVE_TIMEOUT_S)
    if not outcome:
        raise TimeoutError(f"no answer within {RESOLVE_TIMEOUT_S:g} s")
    if isinstance(outcome[0], OSError):
        raise outcome[0]
    return outcome[0]


def _node_ip() -> str | None:
    """This machine's address as Ray sees it: Ray joins that, not 127.0.0.1, for a local host."""
    try:
        import ray.util

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray, no network: just do not try it
        return None


def _discovered(address: RayAddress) -> RayAddress:
    """The cluster ``auto`` joins: RAY_ADDRESS, the last ``ray start`` here, or any Ray running here."""
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # another Ray: let ray.init decide
        return RayAddress(address.text, "local")
    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        raise ClusterUnreachable(
            "Ray address auto: no running Ray cluster found on this machine (no `ray start` here, RAY_ADDRESS "
            "unset); start one with ray start --head, give its address (--address HOST:6379), or leave --address "
            "out for a local Ray"
        ) from None
    if not found or found == "auto":
        return RayAddress(address.text, "local")
    return parse_ray_address(found, "RAY_ADDRESS")


def reach_ray(value: str) -> None:
    """Fail within seconds unless a Ray head answers at Ray address ``value``.

    The host is resolved, a TCP connection opened and the peer must answer like
    a gRPC server (see :func:`_grpc_answer`), each within a few seconds.
    ``local`` passes; ``auto`` is looked up as Ray would. Where the host is this
    machine, its address as Ray sees it counts too.

    Raises:
        OptionError: the address is malformed.
        ClusterUnreachable: the host does not resolve, no connection opens, or
            what answers is no gRPC server; naming the address and the fix.
    """
    address = parse_ray_address(value, "Ray address")
    where = address.text
    if address.kind == "auto":
        address = _discovered(address)
        where = f"{address.text} (what auto found)"
    if address.kind == "local":
        return
    try:
        infos = _resolve(address.host, address.port)
    except OSError as error:  # TimeoutError is one
        reason = error.strerror or str(error)
        raise ClusterUnreachable(f"Ray cluster at {where}: cannot resolve the host {address.host!r} ({reason}); "
                                 "check the name, or give the head's IP address") from None
    targets = list(dict.fromkeys(info[4][:2] for info in infos))[:2]
    try:
        loopback = ipaddress.ip_address(targets[0][0]).is_loopback if targets else False
    except ValueError:
        loopback = False
    node = _node_ip() if loopback else None
    if node and (node, address.port) not in targets:
        targets = [targets[0], (node, address.port)]
    reasons = []
    for target in targets:
        try:
            with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S) as connection:
                answer = _grpc_answer(connection)
        except TimeoutError:
            reasons.append(f"{target[0]}: no connection within {CONNECT_TIMEOUT_S:g} s")
            continue
        except OSError as error:
            reasons.append(f"{target[0]}: {(error.strerror or str(error)).lower()}")
            continue
        if answer is None:
            return
        raise ClusterUnreachable(f"Ray cluster at {where}: something accepts connections at {target[0]} but {answer}, "
                                 f"so it is no Ray head; {address.fix}")
    raise ClusterUnreachable(f"Ray cluster at {where}: nothing accepts connections there ({'; '.join(reasons)}); "
                             f"{address.fix}")


#: An HTTP/2 client's connection preface and an empty SETTINGS frame (RFC 9113, 3.4).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _grpc_answer(connection: socket.socket) -> str | None:
    """None if the peer answers like the gRPC server of a Ray head; else what it did instead.

    Ray's GCS and its Ray Client server are gRPC (HTTP/2) servers, whose first
    frame is a SETTINGS frame; a proxy that accepts any connection, or another
    service on the port, stays silent or answers otherwise, and Ray would retry
    it for minutes. With Ray's TLS on (RAY_USE_TLS) only the connection counts.
    """
    if os.environ.get("RAY_USE_TLS", "").strip().lower() in ("1", "true"):
        return None
    try:
        connection.sendall(_H2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = connection.recv(9 - len(head))
            if not chunk:
                break
            head += chunk
    except TimeoutError:
        return f"sends nothing back within {CONNECT_TIMEOUT_S:g} s"
    except OSError as error:
        return f"drops the connection ({(error.strerror or str(error)).lower()})"
    if len(head) == 9 and head[3] == 0x04:
        return None
    if head.startswith(b"HTTP/"):
        return "answers HTTP/1 (a web server, such as the dashboard on port 8265)"
    return "closes the connection" if not head else "answers in something other than gRPC"
