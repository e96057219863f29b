import io
import json
import subprocess
import sys

import structlog

from xrvd import __version__, log


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "xrvd", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"xrvd {__version__}"


def test_events_are_json_lines_without_patient_identifiers():
    stream = io.StringIO()
    log.configure("info", "json", stream=stream)
    log.get_logger().info("instance.stored", patient_name="DOE^JANE", patient_id="123",
                          sop_instance_uid="1.2.3")
    event = json.loads(stream.getvalue())
    assert event["event"] == "instance.stored"
    assert event["patient_name"] == log.pseudonym("DOE^JANE", log.process_salt())
    assert event["patient_id"] == log.pseudonym("123", log.process_salt())
    assert event["sop_instance_uid"] == "1.2.3"
    structlog.reset_defaults()


def test_patient_identifiers_logged_only_when_config_allows():
    stream = io.StringIO()
    log.configure("info", "json", stream=stream, include_patient_identifiers=True)
    log.get_logger().info("instance.stored", patient_name="DOE^JANE")
    assert json.loads(stream.getvalue())["patient_name"] == "DOE^JANE"
    log.get_logger().debug("hidden")
    assert stream.getvalue().count("\n") == 1  # below the configured level
    structlog.reset_defaults()
