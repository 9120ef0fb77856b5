"""The demo's plumbing end to end (few steps; the README's run uses the default 200)."""

from osstune.cli import main


def test_demo_runs_and_reports(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "demo"), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "before training" in out and "Result:" in out
    assert (tmp_path / "demo" / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "demo" / "run" / "loss.png").is_file()
