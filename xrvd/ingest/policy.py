"""Who may send to xrvd's listener: the called AE title, the peer's address, the calling AE
title, and AE titles bound to an address. Decided when the association is requested, from
the config in force (a reload replaces the policy; associations in flight keep going)."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass

from ..config import InboundTlsConfig, ScpConfig

# A-ASSOCIATE-RJ (result, source, reason): rejected permanent, by the service user, because:
NO_REASON = (0x01, 0x01, 0x01)
CALLING_AET_NOT_RECOGNISED = (0x01, 0x01, 0x03)
CALLED_AET_NOT_RECOGNISED = (0x01, 0x01, 0x07)


@dataclass(frozen=True)
class Verdict:
    reason: str | None = None  # None: accepted
    reject: tuple[int, int, int] = NO_REASON
    detail: str = ""


ACCEPTED = Verdict()


class PeerPolicy:
    def __init__(self, config: ScpConfig):
        self.ae_title = config.ae_title
        self.any_aet = "*" in config.allowed_calling_aets
        self.aets = {aet for aet in config.allowed_calling_aets if aet != "*"}
        self.networks = [_network(peer) for peer in config.allowed_peers]
        self.bound: dict[str, list] = {}
        for rule in config.peers:
            self.bound.setdefault(rule.ae_title, []).append(_network(rule.address))

    @property
    def nobody_allowed(self) -> bool:
        return not self.any_aet and not self.aets and not self.bound

    def check(self, calling: str, called: str, address: str) -> Verdict:
        if called != self.ae_title:
            return Verdict("called_aet_not_recognised", CALLED_AET_NOT_RECOGNISED,
                           f"called AE title {called!r}; this listener is {self.ae_title!r}")
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            return Verdict("peer_not_allowed", detail=f"unusable peer address {address!r}")
        if self.networks and not any(peer in net for net in self.networks):
            return Verdict("peer_not_allowed", detail="address not in scp.allowed_peers")
        if calling in self.bound:
            if not any(peer in net for net in self.bound[calling]):
                return Verdict("peer_not_allowed", detail=f"{calling!r} may send only from "
                               f"its scp.peers addresses, not from {address}")
            return ACCEPTED
        if not (self.any_aet or calling in self.aets):
            return Verdict("calling_aet_not_allowed", CALLING_AET_NOT_RECOGNISED,
                           "not in scp.allowed_calling_aets")
        return ACCEPTED


def _network(text: str):
    return ipaddress.ip_network(text, strict=False)


def tls_context(tls: InboundTlsConfig) -> ssl.SSLContext:
    """The server side of DICOM TLS: TLS 1.2 or newer, xrvd's certificate, and client
    certificates verified against ca_file (required unless require_client_cert is false)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=str(tls.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert \
            else ssl.CERT_OPTIONAL
    return context
