"""The building blocks of the configuration that more than one part of it uses: the strict
section base, AE titles, networks and outbound TLS."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _ae_title(value: str) -> str:
    if not value.strip() or len(value) > 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"must be 1 to 16 printable characters without a backslash, got {value!r}")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_ae_title)]


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network in CIDR notation "
                         "(e.g. 10.1.2.3 or 10.1.2.0/24)") from None
    return value.strip()


Network = Annotated[str, AfterValidator(_network)]


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to may be reachable from outside


class TlsConfig(Section):
    """DICOM over TLS to a destination: the peer's certificate is checked against ca_file
    (and its host name, unless check_hostname is false); cert/key identify xrvd when the
    peer asks for a client certificate."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True
