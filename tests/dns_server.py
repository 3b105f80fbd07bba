"""A small authoritative DNS server for tests: answers A queries for the names it is given,
like Docker's embedded DNS answers a compose service name with every replica's address.

nginx resolves `proxy_pass http://$name` through its `resolver` over UDP (it never reads
/etc/hosts), so tests that run docker/nginx.conf against several API replicas point its
resolver here. The answers can change while it runs (scaling up or down).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

TTL_S = 1


class DnsServer:
    """UDP on 127.0.0.1:`port`; NXDOMAIN for unknown names, no records for other types."""

    def __init__(self, names: dict[str, Iterable[str]]) -> None:
        self._names = {name.lower(): list(addresses) for name, addresses in names.items()}
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = int(self._socket.getsockname()[1])
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_addresses(self, name: str, addresses: Iterable[str]) -> None:
        with self._lock:
            self._names[name.lower()] = list(addresses)

    def start(self) -> DnsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, client = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(wire)
            except dns.exception.DNSException:
                continue
            self._socket.sendto(self._answer(query).to_wire(), client)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        self.queries += 1
        for question in query.question:
            name = question.name.to_text().rstrip(".").lower()
            with self._lock:
                addresses = self._names.get(name)
            if addresses is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A and addresses:
                response.answer.append(
                    dns.rrset.from_text_list(question.name, TTL_S, "IN", "A", addresses)
                )
        return response
