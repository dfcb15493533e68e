"""Staging: a failed run publishes nothing and keeps its work for the next run of the same key; other keys and dead
runs' leftovers are removed; one run per output (lock); a finished output is replaced only with force, in one step."""

import pytest

from quantize.common.errors import QuantizeError
from quantize.common.files import Staging


def test_failure_publishes_nothing_and_keeps_the_work_for_the_same_key(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with Staging(final, force=False, key="k1") as folder:
            (folder / "half-written.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not final.exists() and [p.name for p in tmp_path.iterdir()] == [".out.work-k1"]
    staging = Staging(final, force=False, key="k1")
    with staging as folder:  # the same recipe and code: continues
        assert staging.resumed and (folder / "half-written.bin").read_bytes() == b"x"
        (folder / "report.md").write_text("done")
    assert (final / "half-written.bin").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_other_keys_and_dead_runs_are_cleaned_restart_starts_over(tmp_path):
    final = tmp_path / "out"
    for leftover in (".out.work-oldkey", ".out.partial-12345", ".out.old-12345", ".out.work-k2"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "x").write_text("stale")
    (tmp_path / ".outlier.work-k2").mkdir()  # another output's work: not ours to touch
    staging = Staging(final, force=False, key="k2", restart=True)
    with staging as folder:
        assert not staging.resumed and list(folder.iterdir()) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", ".out.work-k2", ".outlier.work-k2"]


def test_one_run_per_output(tmp_path):
    final = tmp_path / "out"
    with Staging(final, force=False, key="a"):
        with pytest.raises(QuantizeError, match=r"being written by another run \(process \d+\)"):
            with Staging(final, force=False, key="b"):
                pass
    with Staging(final, force=True, key="b"):  # the lock went with the first run
        pass


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
        with Staging(final, force=True, key="k") as folder:
            (folder / "report.md").write_text("half")
            raise KeyboardInterrupt
    assert (final / "report.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.work-k", "out"]


def test_link_files_twice_and_over_leftovers(tmp_path):
    """A resumed run links the cached base log-probabilities again over what the killed run linked or wrote."""
    from quantize.common.files import link_files

    source, target = tmp_path / "cache", tmp_path / "work"
    source.mkdir()
    (source / "000000.npy").write_bytes(b"cached")
    link_files(source, target)
    link_files(source, target)  # the same links again: nothing to do, no error
    (target / "000001.npy").write_bytes(b"other")
    (source / "000001.npy").write_bytes(b"cached 1")
    link_files(source, target)  # a different file in the way: replaced
    assert (target / "000001.npy").read_bytes() == b"cached 1" and (target / "000000.npy").read_bytes() == b"cached"
