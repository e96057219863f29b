"""Who may send: called and calling AE titles, addresses (allowed networks, also changed by a
policy reload), AE titles bound to addresses, and DICOM over TLS with client certificates,
tried with DCMTK's echoscu and storescu and with certificates made by openssl here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from xrvd.config import ScpConfig, validate_config
from xrvd.errors import ConfigError
from xrvd.ingest.policy import PeerPolicy
from xrvd.ingest.scp import StorageSCP

from ..harness import NIH_SC, journal_rows, reasons, require_tool


def _run(tool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([tool, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_the_called_ae_title_must_be_xrvds(listener, events):
    echoscu = require_tool("echoscu", "dcmtk")
    scp = listener(allowed_calling_aets=["*"])
    refused = _run(echoscu, "-aec", "NOTXRVD", "127.0.0.1", scp.port)
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stdout + refused.stderr
    assert reasons(events, "association.rejected") == ["called_aet_not_recognised"]
    assert _run(echoscu, "-aec", "XRVD", "127.0.0.1", scp.port).returncode == 0


def test_rules_work_together():
    policy = PeerPolicy(ScpConfig(
        allowed_calling_aets=["MODALITY"], allowed_peers=["10.0.0.0/8", "127.0.0.1"],
        peers=[{"ae_title": "PACS", "address": "10.1.2.3"},
               {"ae_title": "PACS", "address": "10.9.0.0/16"}]))
    check = policy.check
    assert check("PACS", "XRVD", "10.1.2.3").reason is None
    assert check("PACS", "XRVD", "10.9.8.7").reason is None
    assert check("PACS", "XRVD", "10.1.2.4").reason == "peer_not_allowed"  # moved: no rights
    assert check("MODALITY", "XRVD", "10.5.5.5").reason is None
    assert check("MODALITY", "XRVD", "192.168.1.1").reason == "peer_not_allowed"
    assert check("INTRUDER", "XRVD", "10.5.5.5").reason == "calling_aet_not_allowed"
    assert check("PACS", "OTHER", "10.1.2.3").reason == "called_aet_not_recognised"


def test_a_bound_ae_title_is_refused_from_another_address(listener, events):
    echoscu = require_tool("echoscu", "dcmtk")
    scp = listener(peers=[{"ae_title": "PACS", "address": "10.1.2.3"}])
    refused = _run(echoscu, "-aet", "PACS", "-aec", "XRVD", "127.0.0.1", scp.port)
    assert refused.returncode != 0
    assert reasons(events, "association.rejected") == ["peer_not_allowed"]


def test_peer_outside_allowed_networks_is_rejected(listener):
    scp = listener(allowed_peers=["10.0.0.0/8"])
    ae = AE(ae_title="ANY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="XRVD")
    assert assoc.is_rejected
    scp.apply_policy(ScpConfig(allowed_calling_aets=["*"], allowed_peers=["127.0.0.0/8"]))
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="XRVD")
    assert assoc.is_established
    assoc.release()


def test_check_config_names_every_bad_address():
    with pytest.raises(ConfigError) as info:
        validate_config({"scp": {"allowed_peers": ["10.0.0.0/33", "not-an-ip"],
                                 "peers": [{"ae_title": "PACS", "address": "pacs.local"}]}})
    problems = info.value.problems
    assert any(p.startswith("scp.allowed_peers.0: '10.0.0.0/33' is not an IP address")
               for p in problems)
    assert any(p.startswith("scp.allowed_peers.1: 'not-an-ip'") for p in problems)
    assert any(p.startswith("scp.peers.0.address: 'pacs.local'") for p in problems)


def test_a_listener_beyond_loopback_needs_a_peer_policy(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate_config({"scp": {"bind": "0.0.0.0"}})
    assert "neither allowed_peers nor tls" in info.value.problems[0]
    for policy in ({"allowed_peers": ["10.0.0.0/8"]}, {"allow_any_peer": True}):
        validate_config({"scp": {"bind": "0.0.0.0", **policy}})
    validate_config({"scp": {"bind": "::1"}})
    assert main_check_config(tmp_path, "scp:\n  bind: 0.0.0.0\n") == 2


def main_check_config(tmp_path: Path, text: str) -> int:
    from xrvd.cli import main

    path = tmp_path / "xrvd.yaml"
    path.write_text(text)
    return main(["check-config", str(path)])


# --- TLS ---------------------------------------------------------------------------------


class Certificates:
    """A CA, xrvd's certificate for 127.0.0.1, a client certificate it signed, one from
    another CA, and an expired one it signed, made with openssl."""

    def __init__(self, folder: Path):
        self.openssl = require_tool("openssl", "openssl")
        self.folder = folder
        folder.mkdir()
        (folder / "index.txt").write_text("")
        (folder / "serial").write_text("1000\n")
        self.config = folder / "ca.cnf"
        self.config.write_text(
            f"[ca]\ndefault_ca = test\n[test]\ndir = {folder}\ndatabase = {folder}/index.txt\n"
            f"new_certs_dir = {folder}\nserial = {folder}/serial\ndefault_md = sha256\n"
            "policy = any\ncopy_extensions = copy\nunique_subject = no\n"
            "[any]\ncommonName = supplied\n")
        self.ca, self.ca_key = self._self_signed("test-ca")
        self.server, self.server_key = self._signed("127.0.0.1", san="IP:127.0.0.1")
        self.client, self.client_key = self._signed("modality")
        self.expired, self.expired_key = self._signed(
            "old-modality", dates=("20200101000000Z", "20200102000000Z"))
        self.stranger, self.stranger_key = self._self_signed("stranger")

    def _openssl(self, *args) -> None:
        subprocess.run([self.openssl, *map(str, args)], check=True, capture_output=True,
                       timeout=60)

    def _self_signed(self, name: str) -> tuple[Path, Path]:
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                      "-subj", f"/CN={name}", "-keyout", key, "-out", cert)
        return cert, key

    def _signed(self, name: str, san: str | None = None,
                dates: tuple[str, str] | None = None) -> tuple[Path, Path]:
        cert, key, request = (self.folder / f"{name}.pem", self.folder / f"{name}.key",
                              self.folder / f"{name}.csr")
        self._openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                      *(["-addext", f"subjectAltName={san}"] if san else []),
                      "-keyout", key, "-out", request)
        validity = ["-startdate", dates[0], "-enddate", dates[1]] if dates else ["-days", "2"]
        self._openssl("ca", "-batch", "-notext", "-config", self.config, "-cert", self.ca,
                      "-keyfile", self.ca_key, "-in", request, "-out", cert, *validity)
        return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return Certificates(tmp_path_factory.mktemp("tls") / "certs")


def _tls_listener(listener, certificates, **settings) -> StorageSCP:
    return listener(allowed_calling_aets=["*"], tls={
        "cert_file": certificates.server, "key_file": certificates.server_key,
        "ca_file": certificates.ca}, **settings)


def _tls_args(certificates, cert: Path, key: Path) -> list:
    return ["+tls", key, cert, "+cf", certificates.ca]


def test_tls_with_a_trusted_client_certificate_stores(listener, certificates, events):
    storescu = require_tool("storescu", "dcmtk")
    echoscu = require_tool("echoscu", "dcmtk")
    scp = _tls_listener(listener, certificates)
    args = _tls_args(certificates, certificates.client, certificates.client_key)
    echoed = _run(echoscu, *args, "-aec", "XRVD", "127.0.0.1", scp.port)
    assert echoed.returncode == 0, echoed.stdout + echoed.stderr
    stored = _run(storescu, *args, "-aec", "XRVD", "127.0.0.1", scp.port, NIH_SC)
    assert stored.returncode == 0, stored.stdout + stored.stderr
    assert journal_rows(scp.store.state_dir, "SELECT COUNT(*) FROM instances") == [(1,)]
    accepted = [e for e in events if e["event"] == "association.accepted"]
    assert [e.get("client_certificate") for e in accepted] == ["modality", "modality"]


@pytest.mark.parametrize("client, reason", [
    ("plain", "tls_not_tls"),
    ("stranger", "tls_certificate_untrusted"),
    ("expired", "tls_certificate_expired"),
])
def test_tls_refuses_a_plain_an_untrusted_and_an_expired_client(listener, certificates, events,
                                                                client, reason):
    echoscu = require_tool("echoscu", "dcmtk")
    scp = _tls_listener(listener, certificates)
    args = [] if client == "plain" else _tls_args(
        certificates, getattr(certificates, client), getattr(certificates, f"{client}_key"))
    refused = _run(echoscu, *args, "-to", 10, "-aec", "XRVD", "127.0.0.1", scp.port)
    assert refused.returncode != 0
    # The peer may see the TLS alert before the listener has logged why: stopping waits for it.
    scp.stop(drain_seconds=10)
    assert reasons(events, "association.rejected") == [reason]


def test_tls_on_a_second_port_beside_the_plain_one(listener, certificates, events):
    echoscu = require_tool("echoscu", "dcmtk")
    scp = _tls_listener(listener, certificates, tls_port=0)
    assert scp.tls_port not in (None, scp.port)
    args = _tls_args(certificates, certificates.client, certificates.client_key)
    assert _run(echoscu, *args, "-aec", "XRVD", "127.0.0.1", scp.tls_port).returncode == 0
    assert _run(echoscu, "-aec", "XRVD", "127.0.0.1", scp.port).returncode == 0
    accepted = [e.get("tls") for e in events if e["event"] == "association.accepted"]
    assert accepted == [True, None]
