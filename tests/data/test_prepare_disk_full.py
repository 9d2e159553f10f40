"""`cm3leon prepare` on a disk that fills up (issue 26): a shard whose record
file or commit mark (its JSON) cannot be written is never taken for complete,
neither by the reader nor by a rerun, and the rerun completes it."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from cm3leon_jax.data import prepare, prepare_worker, prepared
from test_prepare import MAX_TOKENS, PER_SHARD, _webdataset, models, rows  # noqa: F401 - fixtures


def _enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


class _FillingWriter:
    """ArrayRecordWriter whose shard 0 (3 records) runs out of space after one."""

    real = None

    def __init__(self, path, options=""):
        self.path, self.n = path, 0
        self.inner = self.real(path, options)

    def write(self, data):
        if "shard-00000-" in self.path and self.n == 1:
            raise _enospc(self.path)
        self.n += 1
        self.inner.write(data)

    def close(self):
        self.inner.close()

    def num_records(self):
        return self.n


@pytest.fixture
def source(tmp_path, rows):  # noqa: F811 - the fixture of test_prepare
    return f"webdataset:{_webdataset(str(tmp_path / 'tars'), rows)}/*.tar"


def _run(source, out, models):  # noqa: F811
    return prepare.prepare(source, out, **models, max_text_tokens=MAX_TOKENS, records_per_shard=PER_SHARD,
                           progress=False)


def _check_failed_run(out, err, shard):
    assert err.value.errno == errno.ENOSPC
    assert str(err.value).startswith(f"cannot write shards to {out}: [Errno 28] No space left on device; free "
                                     "space and rerun the same command: the "), str(err.value)
    assert prepare_worker.shard_stem(shard, 3) + ".json" not in os.listdir(out)  # no commit mark
    with pytest.raises(ValueError, match="not complete|incomplete|rerun"):
        prepared.PreparedDataset(out)  # the reader refuses the unfinished dataset


def _check_rerun_completes(source, out, models):  # noqa: F811
    report = _run(source, out, models)
    assert report["written"] == 6 and report["shards"] == 3
    ds = prepared.PreparedDataset(out)
    assert len(ds) == 6 and sorted(ds.ids.tolist()) == [0, 1, 2, 5, 6, 7]
    assert all(ds[r]["image_ids"].size and ds[r]["text_ids"].size for r in range(6))
    assert not [f for f in os.listdir(out) if f.startswith(prepare_worker.TMP_PREFIX)]


def test_a_record_file_cut_short_is_never_a_shard(source, models, tmp_path, monkeypatch):  # noqa: F811
    from array_record.python import array_record_module

    out = str(tmp_path / "out")
    _FillingWriter.real = array_record_module.ArrayRecordWriter
    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", _FillingWriter)
    with pytest.raises(OSError) as err:
        _run(source, out, models)
    assert prepare_worker.shard_stem(0, 3) + prepare.RECORD_SUFFIX not in os.listdir(out)
    _check_failed_run(out, err, 0)
    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", _FillingWriter.real)
    _check_rerun_completes(source, out, models)


def test_a_commit_mark_cut_short_is_never_a_shard(source, models, tmp_path, monkeypatch):  # noqa: F811
    out = str(tmp_path / "out")
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up as shard 1's JSON is flushed: half of it is on disk
        if prepare_worker.shard_stem(1, 3) + ".json" in os.readlink(f"/proc/self/fd/{fd}"):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            raise _enospc(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as err:
        _run(source, out, models)
    _check_failed_run(out, err, 1)
    monkeypatch.setattr(os, "fsync", real_fsync)
    _check_rerun_completes(source, out, models)
