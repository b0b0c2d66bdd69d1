"""Who may open an association: the calling AE title checked against `[[peers]]` and the
address it calls from.

A peer's AE title is no secret: anyone who knows the title of the PACS could otherwise be
treated as the PACS. So a `[[peers]]` entry binds its title to the addresses of its host
(resolved when the rule is made, and again when a caller does not match, since addresses
change), unless the entry says `any_address = true`. Titles that are not peers are let in
only while `node.accept_unknown_callers` is true.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from node.config import Config, Peer

log = logging.getLogger(__name__)


def _addresses(host: str) -> frozenset[str]:
    """The IP addresses of `host` (itself when it is one), normalised; empty if unknown."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("cannot resolve the address of peer host %r: %s", host, exc)
        return frozenset()
    return frozenset(str(ipaddress.ip_address(info[4][0])) for info in infos)


def _normalised(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


class Admission:
    """Callable (calling AE, called AE, remote address) -> None, or why it is rejected."""

    def __init__(self, config: Config) -> None:
        self.accept_unknown = config.node.accept_unknown_callers
        self.peers: dict[str, Peer] = {peer.ae_title: peer for peer in config.peers}
        self._addresses = {
            peer.ae_title: _addresses(peer.host) for peer in config.peers if not peer.any_address
        }

    def is_peer(self, calling: str) -> bool:
        """Whether `calling` is a [[peers]] AE title (asked once `__call__` let it in)."""
        return calling in self.peers

    def is_peer_host(self, address: str) -> bool:
        """Whether `address` is the host of a [[peers]] entry bound to its addresses."""
        remote = _normalised(address)
        return any(remote in addresses for addresses in self._addresses.values())

    def __call__(self, calling: str, called: str, address: str) -> str | None:
        peer = self.peers.get(calling)
        if peer is None:
            if self.accept_unknown:
                return None
            return "not a [[peers]] AE title (node.accept_unknown_callers is false)"
        if peer.any_address:
            return None
        remote = _normalised(address)
        if remote in self._addresses[calling]:
            return None
        self._addresses[calling] = _addresses(peer.host)  # the host may have moved
        if remote in self._addresses[calling]:
            return None
        return f"[[peers]] binds it to host {peer.host}"
