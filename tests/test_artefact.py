"""Staging: a failed run leaves nothing; a finished output is replaced only with force."""

import pytest

from quantize.common.files import Staging
from quantize.common.errors import QuantizeError


def test_failure_inside_staging_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with Staging(final, force=False) as folder:
            (folder / "half-written.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_finished_output_needs_force(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "report.md").write_text("old")
    with pytest.raises(QuantizeError, match="already exists .a finished run.; pass --force"):
        with Staging(final, force=False):
            pass
    assert (final / "report.md").read_text() == "old"
    with Staging(final, force=True) as folder:
        (folder / "report.md").write_text("new")
    assert (final / "report.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_forced_run_keeps_the_old_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "report.md").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with Staging(final, force=True) as folder:
            (folder / "report.md").write_text("half")
            raise KeyboardInterrupt
    assert (final / "report.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
