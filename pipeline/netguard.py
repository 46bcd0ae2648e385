"""Outbound requests to addresses clients give us (webhooks): never to our own network.

A client could name a URL on the machine itself, the cloud's metadata service
(169.254.169.254) or another host of the private network, and have our workers call it.
`check` refuses a URL whose host resolves to anything but public unicast addresses, and
`post` sends to exactly the address it checked: it resolves once, checks every answer,
then connects to a checked address itself, keeping the name for the Host header and for
TLS (SNI and the certificate check). A name that resolved to a public address when the
job was submitted and to a private one now (DNS rebinding) is refused at that moment.
Redirects are never followed: the next hop would be unchecked.

`Guard(allow_private=True)` (WEBHOOK_ALLOW_PRIVATE=1) lets an operator send to their
own network, and lets tests use a receiver on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import urllib3

MAX_URL_LENGTH = 2048
SCHEMES = {"http": 80, "https": 443}
# Carrier-grade NAT; Python's is_global is False for it already, named here for the reader.
SHARED_SPACE = ipaddress.ip_network("100.64.0.0/10")
# IPv6 prefixes that carry an IPv4 address inside: judged by the address they carry.
NAT64 = ipaddress.ip_network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list]


class Refused(Exception):
    """The URL or the address it resolves to may not be called; the message says why."""


class Unresolved(Refused):
    """The host has no address now: refused at submit, but may be passing trouble later."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # without brackets, lower case
    port: int
    path: str  # path and query, what goes on the request line

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SCHEMES[self.scheme] else f"{host}:{self.port}"


@dataclass(frozen=True)
class Answer:
    status: int
    address: str


def parse(url: str) -> Target:
    """The URL's parts, or Refused for what is not a plain http(s) URL without credentials."""
    if not isinstance(url, str) or not url:
        raise Refused("the URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise Refused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise Refused("the URL has spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused(f"the URL cannot be read ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise Refused("the URL must start with https:// or http://")
    if parts.username is not None or parts.password is not None:
        raise Refused("the URL must not carry a user name or password")
    if not parts.hostname:
        raise Refused("the URL has no host")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return Target(scheme, parts.hostname.lower(), port or SCHEMES[scheme], path)


# What is refused, in the order it is told: the first that holds names the reason.
REFUSED = (
    ("a loopback address", lambda a: a.is_loopback),
    ("a link-local address (cloud metadata lives there)", lambda a: a.is_link_local),
    ("a multicast address", lambda a: a.is_multicast),
    ("the unspecified address", lambda a: a.is_unspecified),
    ("a carrier-grade NAT address", lambda a: a in SHARED_SPACE),
    ("a private or reserved address", lambda a: a.is_private or not a.is_global),
)


def refusal(address: Address) -> str | None:
    """Why a connection to `address` is refused; None for a public unicast address."""
    inner = _embedded_ipv4(address)
    if inner is not None:
        return refusal(inner)
    return next((reason for reason, holds in REFUSED if holds(address)), None)


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.teredo is not None:
        return address.teredo[1]
    return None


@dataclass(frozen=True)
class Guard:
    """Which addresses may be called, and how names are resolved (tests pass a resolver)."""

    allow_private: bool = False
    resolver: Resolver = field(default=socket.getaddrinfo, repr=False)

    def resolve(self, target: Target) -> list[Address]:
        """Every address the host has now (an address literal is itself)."""
        try:
            return [ipaddress.ip_address(target.host)]
        except ValueError:
            pass
        try:
            infos = self.resolver(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise Unresolved(f"the host {target.host} does not resolve ({exc})") from None
        addresses = list(dict.fromkeys(
            ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))
        if not addresses:
            raise Unresolved(f"the host {target.host} has no address")
        return addresses

    def check(self, url: str) -> tuple[Target, list[Address]]:
        """The URL's target and addresses, every one of them allowed; else Refused."""
        target = parse(url)
        addresses = self.resolve(target)
        if not self.allow_private:
            for address in addresses:
                reason = refusal(address)
                if reason is not None:
                    raise Refused(f"the host {target.host} resolves to {address}, {reason}")
        return target, addresses

    def post(self, url: str, body: bytes, headers: dict[str, str], *,
             timeout: float) -> Answer:
        """POST `body` to the checked address; the answer's status. Connection errors and
        timeouts raise urllib3's errors; a refused address raises Refused (Unresolved
        when the name has no address now)."""
        target, addresses = self.check(url)
        last_error: Exception | None = None
        for address in addresses:
            try:
                return Answer(_post_to(target, address, body, headers, timeout),
                              str(address))
            except urllib3.exceptions.ConnectTimeoutError as exc:  # NewConnectionError too
                last_error = exc  # the next address may answer
        raise last_error  # type: ignore[misc]  # at least one address was tried


def _post_to(target: Target, address: Address, body: bytes, headers: dict[str, str],
             timeout: float) -> int:
    options: dict = {}
    if target.scheme == "https":
        # Connect to the address, but speak TLS to the name: SNI and the certificate
        # check are for the host in the URL, as if we had let the library resolve it.
        options = {"server_hostname": target.host, "assert_hostname": target.host,
                   "cert_reqs": "CERT_REQUIRED"}
    pool_class = (urllib3.HTTPSConnectionPool if target.scheme == "https"
                  else urllib3.HTTPConnectionPool)
    pool = pool_class(str(address), target.port, maxsize=1, retries=False,
                      timeout=urllib3.Timeout(connect=timeout, read=timeout), **options)
    try:
        response = pool.urlopen("POST", target.path, body=body,
                                headers={**headers, "Host": target.host_header},
                                redirect=False, retries=False, preload_content=False,
                                assert_same_host=False)
        try:
            response.read(4096, decode_content=False)  # the answer's body is not ours to keep
        finally:
            response.release_conn()
        return response.status
    finally:
        pool.close()
