"""Operations commands: `xrvd status`, `xrvd retry`, `xrvd echo`. Human output by default,
`--json` for scripts."""

from __future__ import annotations

import json
import time

from ..config import Config
from ..store import Store, read_status


def status(config: Config, as_json: bool) -> str:
    report = read_status(config.state_dir)
    report["model"] = config.model.name
    from .. import __version__

    report["xrvd_version"] = __version__
    sent = report.pop("deliveries")
    report["destinations"] = [
        {"name": d.name, **({"url": d.url} if d.type == "dicomweb" else
                            {"ae_title": d.ae_title, "host": d.host, "port": d.port}),
         **sent.get(d.name, {"sent": 0, "pending": 0, "failed": 0, "last_error": None})}
        for d in config.destinations]
    if as_json:
        return json.dumps(report, indent=2)
    studies, instances = report["studies"], report["instances"]
    lines = [
        f"xrvd {__version__}, model {config.model.name}, state {config.state_dir}",
        "studies:   " + (", ".join(f"{n} {s}" for s, n in sorted(studies.items())) or "none"),
        "instances: " + (", ".join(f"{n} {s}" for s, n in sorted(instances.items())) or "none"),
        f"queue:     {report['queue_depth']} studies waiting or processing",
        _spool_line(report["spool"], config),
    ]
    if report["oldest_waiting"]:
        oldest = report["oldest_waiting"]
        lines.append(f"oldest:    {oldest['study_instance_uid']} "
                     f"(last image {oldest['waiting_s']:.0f} s ago)")
    if report["skipped_by_reason"]:
        lines.append("skipped:   " + ", ".join(
            f"{n} {reason}" for reason, n in sorted(report["skipped_by_reason"].items())))
    if report["last_run"]:
        run = report["last_run"]
        lines.append(f"last run:  {run['model']} ({run['weights_sha256'][:12]}), "
                     f"{run['finished_ago_s']:.0f} s ago")
    for destination in report["destinations"]:
        where = destination.get("url") or \
            f"{destination['ae_title']}@{destination['host']}:{destination['port']}"
        lines.append(f"dest:      {destination['name']} = {where}: {destination['sent']} sent, "
                     f"{destination['pending']} pending, {destination['failed']} failed"
                     + (f"; last error: {destination['last_error']}"
                        if destination["last_error"] else ""))
    for name, source in report["sources"].items():
        studies = source["studies"]
        lines.append(f"source:    {name}: days {source['first_day']} to {source['last_day']} "
                     f"queried ({source['days_queried']}); studies " + (", ".join(
                         f"{n} {state}" for state, n in sorted(studies.items())) or "none")
                     + f"; {source['instances_retrieved']} instances retrieved")
    for failure in report["failed_studies"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(failure["since"]))
        lines.append(f"FAILED     {failure['study_instance_uid']} after "
                     f"{failure['attempts']} attempts, {when}: {failure['reason']}")
    if report["failed_studies"]:
        lines.append("           `xrvd retry` puts failed studies back into the queue.")
    return "\n".join(lines)


def _spool_line(spool: dict, config: Config) -> str:
    free = "unknown" if spool["free_bytes"] is None else f"{spool['free_bytes'] / 2**30:.1f} GB"
    return (f"spool:     {spool['files']} files, {spool['bytes'] / 2**20:.1f} MB "
            f"(keep_spool {config.storage.keep_spool}); {free} free on {config.state_dir}")


def retry(config: Config, as_json: bool) -> str:
    store = Store(config.state_dir)
    try:
        count = store.retry_failed()
    finally:
        store.close()
    if as_json:
        return json.dumps({"requeued_studies": count})
    return f"{count} failed studies put back into the queue"


def echo(host: str, port: int, called_aet: str, calling_aet: str, timeout: float,
         as_json: bool, tls_args=None) -> tuple[int, str]:
    """C-ECHO, as DCMTK's echoscu does; exit 0 only on status 0x0000."""
    from pynetdicom.sop_class import Verification

    from ..ingest.net import RequestorAE

    ae = RequestorAE(calling_aet, timeout=timeout, peer=f"{host}:{port}")
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args)
    result: dict = {"host": host, "port": port, "called_aet": called_aet,
                    "calling_aet": calling_aet}
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        code = int(status.Status) if "Status" in status else None
        result.update(ok=code == 0, status=None if code is None else f"0x{code:04X}")
    elif assoc.is_rejected:
        rj = assoc.acceptor.primitive
        result.update(ok=False, error=f"association rejected (result {rj.result}, source "
                      f"{rj.result_source}, reason {rj.diagnostic}): is {calling_aet} in the "
                      "peer's list of allowed callers?")
    else:
        result.update(ok=False, error="no association (connection refused, aborted or timed "
                      "out): check host, port and firewall")
    result["duration_s"] = round(time.perf_counter() - started, 3)
    if as_json:
        return (0 if result["ok"] else 1), json.dumps(result)
    target = f"{called_aet}@{host}:{port}"
    if result["ok"]:
        return 0, f"C-ECHO {target}: success ({result['duration_s'] * 1000:.0f} ms)"
    return 1, f"C-ECHO {target}: FAILED: {result.get('error') or result.get('status')}"
