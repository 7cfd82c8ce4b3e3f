"""Ray's session folder: short enough for its Unix sockets whatever TMPDIR is.

Clusters and HPC systems set long ``TMPDIR``s; Ray puts sockets several levels
below ``$TMPDIR/ray`` and fails once one path passes 107 bytes. r2sweep's own
start-up of a local Ray must cope (or say what to set).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from r2sweep.core.errors import ConfigError
from r2sweep.tune.cluster import connect
from r2sweep.tune.ray_temp import MAX_TEMP_DIR_LENGTH, SOCKET_PATH_LIMIT, local_temp_dir


def _long_folder(tmp_path: Path) -> Path:
    folder = tmp_path / ("x" * 60)
    folder.mkdir()
    assert len(str(folder / "ray")) > MAX_TEMP_DIR_LENGTH
    return folder


def test_a_short_tmpdir_is_ray_s_own_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", "/tmp")
    assert local_temp_dir() == "/tmp/ray"


def test_a_long_tmpdir_falls_back_to_tmp_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(_long_folder(tmp_path)))
    assert local_temp_dir() == "/tmp/ray"
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "TMPDIR is too long" in note[0] and "RAY_TMPDIR" in note[0]


def test_a_long_ray_tmpdir_is_refused_naming_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(_long_folder(tmp_path)))
    with pytest.raises(ConfigError, match=rf"RAY_TMPDIR=.* at most {MAX_TEMP_DIR_LENGTH} bytes .*{SOCKET_PATH_LIMIT}"):
        local_temp_dir()


def test_a_short_ray_tmpdir_is_used_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_TMPDIR", "/tmp/r2")
    monkeypatch.setenv("TMPDIR", str(_long_folder(tmp_path)))
    assert local_temp_dir() == "/tmp/r2/ray"


@pytest.mark.ray
def test_a_local_ray_starts_under_a_long_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real start-up: with TMPDIR this long, Ray's default fails on its socket paths."""
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(_long_folder(tmp_path)))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    try:
        connect(None, num_cpus=1)
        assert ray.is_initialized()
        assert ray.cluster_resources().get("CPU") == 1
        session = ray.get_runtime_context().gcs_address  # the session is alive and answering
        assert session
    finally:
        ray.shutdown()
    assert os.path.isdir("/tmp/ray")
