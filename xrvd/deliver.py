"""Delivery: each report to each configured destination by C-STORE, retried with backoff.

One thread per destination, so a destination that is down (and its timeouts) never holds up
another, nor classification. State lives in the journal; warning statuses (0xB000, 0xB006,
0xB007) count as success, as the standard says they mean "stored". The threads share the
reports they read (report.files.EncodedReports): each file is read once, not once per
destination and attempt.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from . import metrics
from .config import Config, Destination
from .sources import DicomwebDestination
from .log import get_logger
from .report.files import EncodedReport, EncodedReports, heatmap_files
from .store import Store

SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


def tls_arguments(destination: Destination):
    if destination.tls is None:
        return None
    tls = destination.tls
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    context.check_hostname = tls.check_hostname
    if tls.cert_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return context, destination.host if tls.check_hostname else None


# Makes the AE a C-STORE goes out on: (calling AE title, timeout=, peer=) -> pynetdicom AE.
# runtime.py passes ingest.net.RequestorAE, whose associations bound what the destination
# sends back (this wing cannot import it).
RequestorFactory = Callable[..., AE]


def send_report(path: str, destination: Destination | DicomwebDestination, timeout: float,
                reports: EncodedReports | None = None, *,
                requestor: RequestorFactory) -> tuple[bool, str]:
    """One C-STORE association (or one STOW-RS request) with a report in the destination's SR
    flavour and its heatmap key images before it: (all stored, what happened). reports: the
    reports read for sending so far (the file is read there once, for every destination and
    attempt); without it the file is read for this send alone."""
    read = reports.get if reports is not None else EncodedReport
    report = read(path).dataset(destination.sr_flavour)
    # Key images first: a viewer that opens the report as it arrives finds what it cites.
    # They are read like the report, once for every destination and attempt (as_flavour
    # leaves an image as it is).
    instances = [read(heatmap).dataset(destination.sr_flavour)
                 for heatmap in heatmap_files(path)] + [report]
    if destination.type == "dicomweb":
        return stow_report(instances, destination, timeout)
    ae = requestor(destination.calling_aet, timeout=timeout,
                   peer=f"{destination.host}:{destination.port}")
    classes = list(dict.fromkeys(str(ds.SOPClassUID) for ds in instances))
    for sop_class in classes:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         tls_args=tls_arguments(destination))
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        return False, (f"association rejected (result {rj.result}, source {rj.result_source}, "
                       f"reason {rj.diagnostic})")
    if not assoc.is_established:
        if assoc.rejected_contexts:  # negotiated, but our SR class was refused
            return False, f"the destination does not accept {report.SOPClassUID.name}"
        return False, "no association: connection refused, aborted or timed out"
    try:
        accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
        refused = [sop_class for sop_class in classes if sop_class not in accepted]
        if refused:
            names = ", ".join(UID(sop_class).name for sop_class in refused)
            hint = (": let it accept Secondary Capture or set output.heatmaps to false"
                    if len(instances) > 1 and refused != [str(report.SOPClassUID)] else "")
            return False, f"the destination does not accept {names}{hint}"
        codes = []
        for instance in instances:
            stored, detail = _c_store(assoc, instance)
            if not stored:
                what = "the report" if instance is report else "a heatmap key image"
                return False, f"{detail} (sending {what})"
            codes.append(detail)
    finally:
        if assoc.is_established:
            assoc.release()
    return True, codes[-1] + (f" with {len(instances) - 1} heatmap(s)" if len(codes) > 1
                              else "")


def _c_store(assoc, instance) -> tuple[bool, str]:
    status = assoc.send_c_store(instance)
    if "Status" not in status:
        return False, "no C-STORE response (timed out or aborted)"
    code = int(status.Status)
    comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
    if code in SUCCESS_STATUSES:
        return True, f"status 0x{code:04X}"
    return False, f"C-STORE failed with status 0x{code:04X}{comment}"


def stow_report(instances: list, destination: DicomwebDestination,
                timeout: float) -> tuple[bool, str]:
    """STOW-RS of a report (the last of `instances`) and its heatmaps in one request: stored
    when the server lists every one in ReferencedSOPSequence (a FailedSOPSequence entry, or
    an HTTP error, says why not)."""
    from .web import client, describe_http_error, session

    try:
        with session(destination.auth, destination.tls, timeout) as http:
            response = client(destination.url, http).store_instances(instances)
    except Exception as exc:  # noqa: BLE001 - every failure is one failed attempt
        _reason, _retry, detail = describe_http_error(exc)
        return False, f"STOW-RS failed: {detail}"
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reason = failed[0].get("FailureReason")
        return False, f"STOW-RS refused the report (failure reason {reason})"
    stored = response.get("ReferencedSOPSequence") if response is not None else None
    listed = {item.get("ReferencedSOPInstanceUID") for item in stored or ()}
    if all(instance.SOPInstanceUID in listed for instance in instances):
        return True, "STOW-RS stored" + (f" with {len(instances) - 1} heatmap(s)"
                                         if len(instances) > 1 else "")
    return False, "STOW-RS answered without listing the report as stored"


class Deliverer:
    def __init__(self, config: Config, store: Store, requestor: RequestorFactory):
        self.config = config
        self.store = store
        self.requestor = requestor
        self.log = get_logger(component="deliver")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self.reports = EncodedReports()  # shared by the destinations' threads

    def start(self) -> None:
        for destination in self.config.destinations:
            self._start_thread(destination.name)

    def _start_thread(self, name: str) -> None:
        thread = threading.Thread(target=self._run, args=(name,), name=f"xrvd-deliver-{name}",
                                  daemon=True)
        self._threads[name] = thread
        thread.start()

    def apply(self, config: Config) -> None:
        """Reloaded destinations: new ones start sending, removed ones stop after the send in
        hand (their pending reports are marked failed with the reason)."""
        self.config = config
        for destination in config.destinations:
            if destination.name not in self._threads or \
                    not self._threads[destination.name].is_alive():
                self._start_thread(destination.name)
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads.values():
            thread.join(timeout)

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads.values())

    def _destination(self, name: str) -> Destination | None:
        return next((d for d in self.config.destinations if d.name == name), None)

    def _run(self, name: str) -> None:
        while not self._stop.is_set():
            destination = self._destination(name)
            try:
                due = self.store.due_deliveries(name)
                for delivery_id, path, attempts, created_at in due:
                    if self._stop.is_set():
                        return
                    if destination is None:
                        self.store.delivery_done(delivery_id, "failed",
                                                 "destination removed from the config")
                        continue
                    self._deliver(destination, delivery_id, path, attempts, created_at)
                if destination is None:
                    return
                wait = self.store.next_delivery_in(name)
            except Exception as exc:  # noqa: BLE001 - delivery must keep running
                self.log.error("deliver.error", destination=name, error=repr(exc))
                wait = 5.0
            self._wake.wait(1.0 if wait is None else min(wait, 1.0))
            self._wake.clear()

    def _deliver(self, destination: Destination, delivery_id: int, path: str, attempts: int,
                 created_at: float) -> None:
        policy = self.config.delivery
        started = time.perf_counter()
        try:
            stored, detail = send_report(path, destination, policy.timeout_seconds,
                                         self.reports, requestor=self.requestor)
        except Exception as exc:  # noqa: BLE001 - a broken file or peer is one failure
            stored, detail = False, f"{type(exc).__name__}: {exc}"
        fields = dict(destination=destination.name, report=path, attempt=attempts + 1,
                      detail=detail, duration_s=round(time.perf_counter() - started, 3))
        if stored:
            self.store.delivery_done(delivery_id, "sent")
            metrics.SENT.labels(destination.name).inc()
            self.log.info("report.sent", **fields)
            return
        too_old = time.time() - created_at > policy.max_age_hours * 3600
        if attempts + 1 >= policy.max_attempts or too_old:
            self.store.delivery_done(delivery_id, "failed", detail)
            self.log.error("report.send_failed", final=True, **fields)
            return
        retry_in = min(policy.retry_seconds * 2 ** attempts, policy.max_retry_seconds)
        self.store.delivery_done(delivery_id, "pending", detail, retry_in)
        self.log.warning("report.send_failed", final=False, retry_in_s=retry_in, **fields)
