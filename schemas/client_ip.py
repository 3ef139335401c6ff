"""The client IP as the ledger stores it, by privacy regime (``TOKENAUDIT_LEDGER_CLIENT_IP``).

One declaration for the sink, which writes the stored form, and the reports, which match a
caller's ``--ip`` against it: ``full``; ``truncated`` (IPv4 to its /24, IPv6 to its /48: the
network, not the host); ``hashed`` (HMAC-SHA256 with a deployment secret, the first 32 hex
digits: one address always gives the same value, so one caller's calls can still be found,
and the address cannot be read back).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable

MODES = ("full", "truncated", "hashed")


def truncate_ip(ip: str) -> str:
    """IPv4 to its /24, IPv6 to its /48; text that is no address (a proxy's odd value) to ''."""
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ""
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


def hash_ip(ip: str, secret: bytes) -> str:
    return hmac.new(secret, ip.encode(), hashlib.sha256).hexdigest()[:32] if ip else ""


def ip_policy(mode: str, secret: bytes = b"") -> Callable[[str], str]:
    """The transform of a privacy regime (``full``, ``truncated`` or ``hashed``)."""
    if mode == "full":
        return str
    if mode == "truncated":
        return truncate_ip
    if mode == "hashed":
        if not secret:
            raise ValueError("hashed client IPs need a secret")
        return lambda ip: hash_ip(ip, secret)
    raise ValueError(f"unknown client IP mode {mode!r}; expected one of {', '.join(MODES)}")


def stored_forms(ip: str) -> list[str]:
    """What a ledger may hold for ``ip`` without knowing its regime or secret: the address itself
    and its truncated network (a hashed ledger is searched by the hash its rows show)."""
    forms = [ip]
    network = truncate_ip(ip)
    if network and network != ip:
        forms.append(network)
    return forms
