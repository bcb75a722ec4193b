"""compressor/fileio.py: a write lands whole or not at all, with the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat

import pytest

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_path, write_json_atomic, write_text_atomic


def test_a_written_file_has_the_umask_mode_not_mkstemps_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "sub" / "report.md", "hello")
    finally:
        os.umask(previous)
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by a server running as another user


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_json_atomic(tmp_path / "report.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "v": 1\n}\n' and sorted(tmp_path.iterdir()) == [target]


def test_an_os_error_becomes_one_line_naming_the_file(tmp_path):
    with pytest.raises(CompressorError, match=r"could not write .*model.onnx: .*choose another --out"):
        with atomic_path(tmp_path / "model.onnx"):
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
