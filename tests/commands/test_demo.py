"""`xrvd demo`: classifies the bundled sample with the real weights where they are, and
says so loudly when it falls back to untrained ones (offline)."""

from xrvd.cli import main
from xrvd.pipeline.registry import get_spec

from ..harness import MODEL


def test_demo_without_network_runs_untrained_and_says_so(tmp_path, capsys, monkeypatch):
    from xrvd.pipeline.untrained import ALLOW_UNTRAINED_ENV

    monkeypatch.delenv(ALLOW_UNTRAINED_ENV, raising=False)
    config = tmp_path / "xrvd.yaml"
    # Nothing listens on loopback port 9: the download fails at once, as offline.
    config.write_text(f"state_dir: {tmp_path}\nmodel:\n  download_url: http://127.0.0.1:9\n")
    assert main(["demo", "-c", str(config)]) == 0
    captured = capsys.readouterr()
    assert "The real weights are not available here" in captured.err
    assert "NOT A DIAGNOSIS" in captured.err
    assert "rsna_cr_chest_jpeg_baseline.dcm" in captured.out
    assert "n/a (untrained)" in captured.out and "POSITIVE" not in captured.out
    assert not (tmp_path / "models" / get_spec(MODEL).weights_file).exists()


def test_demo_with_weights_present_uses_them(untrained_weights, tmp_path, capsys):
    """With weights in place the demo classifies with them (and never falls back)."""
    import torch

    from xrvd.pipeline.weights import UNTRAINED_MARKER

    spec = get_spec(MODEL)
    network = torch.load(untrained_weights(MODEL) / spec.weights_file, weights_only=False)
    delattr(network, UNTRAINED_MARKER)
    (tmp_path / "models").mkdir()
    torch.save(network, tmp_path / "models" / spec.weights_file)
    config = tmp_path / "xrvd.yaml"
    config.write_text(f"state_dir: {tmp_path}\n")
    assert main(["demo", "-c", str(config)]) == 0
    captured = capsys.readouterr()
    assert "not available" not in captured.err
    assert "Finding" in captured.out and "untrained" not in captured.out
