"""`xrvd status`, `xrvd retry` and `xrvd echo`: what they print and their exit status, on a
journal made with the store's own calls and against a real SCP."""

from __future__ import annotations

import json

from xrvd.cli import main
from xrvd.commands.ops import status
from xrvd.config import ScpConfig, validate_config
from xrvd.ingest.scp import StorageSCP
from xrvd.store import Store

from ..harness import MODEL, NIH_SC, copy_with_new_uids, finished_study


def test_status_and_retry(tmp_path, capsys):
    state = tmp_path / "state"
    store = Store(state)
    copy_with_new_uids(NIH_SC, tmp_path / "a.dcm")
    store.store_file(tmp_path / "a.dcm", source="test", move=False)
    [claim] = store.claim_ready_studies(0, MODEL, "w", 10)
    store.fail_attempt(claim, "OSError: output folder not writable", 1, 0)
    store.close()
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {state}\n")

    assert main(["status", "-c", str(config)]) == 0
    text = capsys.readouterr().out
    assert "1 failed" in text and "output folder not writable" in text and "xrvd retry" in text
    assert main(["status", "-c", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["studies"] == {"failed": 1}
    assert report["failed_studies"][0]["study_instance_uid"] == claim.study_uid
    assert report["model"] == MODEL

    assert main(["retry", "-c", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"requeued_studies": 1}
    assert main(["status", "-c", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["studies"] == {"receiving": 1} and report["queue_depth"] == 1


def test_status_without_a_journal_says_what_to_check(tmp_path, capsys):
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'nothing'}\n")
    assert main(["status", "-c", str(config)]) == 2
    assert "no journal" in capsys.readouterr().err


def test_echo_against_a_real_peer(tmp_path, capsys):
    from xrvd import log

    log.configure("info", "console", stream="stderr")  # the peer's events stay off stdout
    store = Store(tmp_path / "state")
    scp = StorageSCP(ScpConfig(port=0, allowed_calling_aets=["XRVD-ECHO", "XRVD"]), store)
    port = scp.start()
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nscp:\n  port: {port}\n"
                      f"destinations:\n  - name: pacs\n    ae_title: XRVD\n"
                      f"    host: 127.0.0.1\n    port: {port}\n")
    try:
        assert main(["echo", "pacs", "-c", str(config), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["ok"] and result["status"] == "0x0000" and result["port"] == port
        assert main(["echo", "nowhere", "-c", str(config)]) == 2
        assert "no destination named 'nowhere' (known: pacs)" in capsys.readouterr().err
        assert main(["echo", "-c", str(config)]) == 0
        assert "success" in capsys.readouterr().out
        assert main(["echo", "-c", str(config), "--calling-aet", "STRANGER", "--json"]) == 1
        result = json.loads(capsys.readouterr().out)
        assert result["ok"] is False and "rejected" in result["error"]
    finally:
        scp.stop()
        store.close()
    assert main(["echo", "--host", "127.0.0.1", "--port", str(port), "--timeout", "5"]) == 1
    assert "no association" in capsys.readouterr().out


def test_status_shows_the_spool_and_free_space(store, tmp_path):
    finished_study(store, tmp_path)
    config = validate_config({"state_dir": str(store.state_dir)})
    report = json.loads(status(config, as_json=True))
    assert report["spool"]["files"] == 1 and report["spool"]["bytes"] > 0
    assert report["spool"]["free_bytes"] > 0
    assert "spool:     1 files" in status(config, as_json=False)
