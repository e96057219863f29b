"""`backfill --source --dry-run`'s plan (commands/backfill_plan.py): which weights a run would
report under, so that 'reported before' means by this model and these weights. The dry run
itself, against Orthanc, is in test_backfill_source.py."""

from __future__ import annotations

import hashlib

from xrvd.commands.backfill_plan import reporting_weights_sha256
from xrvd.config import validate_config
from xrvd.pipeline import package
from xrvd.pipeline.registry import get_spec
from xrvd.pipeline.weights import weights_path

MODEL = "densenet121-res224-all"


def test_the_weights_a_run_reports_under(tmp_path):
    config = validate_config({"state_dir": str(tmp_path / "state"),
                              "model": {"name": MODEL, "weights_dir": str(tmp_path)}})
    assert reporting_weights_sha256(config) is None  # nothing installed: any weights count

    graph = b"not a graph: read() checks the archive and the manifest, not the graph's run"
    manifest = {"format": package.FORMAT, "kind": package.KIND, "weights_sha256": "ab" * 32,
                "onnx_size": len(graph), "onnx_sha256": hashlib.sha256(graph).hexdigest()}
    installed = package.package_path(get_spec(MODEL), tmp_path)
    installed.write_bytes(package.encode(manifest, graph))
    assert reporting_weights_sha256(config) == "ab" * 32  # a service install's package

    weights = weights_path(get_spec(MODEL), tmp_path)
    weights.write_bytes(b"weights")
    assert reporting_weights_sha256(config) == hashlib.sha256(b"weights").hexdigest()

    weights.unlink()
    installed.write_bytes(b"damaged")
    assert reporting_weights_sha256(config) is None
