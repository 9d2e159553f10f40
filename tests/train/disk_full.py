"""A file system that fills up, in-process and without privileges: the
Python-level writes of a checkpoint (etils epath's write_text / write_bytes,
which Orbax uses for its JSON items and every metadata file) write part of
their bytes and then raise OSError(ENOSPC), as a full disk does. Tensorstore's
array files are written by C++ and are not intercepted: the step is left
half-written (arrays there, metadata missing or cut short).

    with DiskFull(ckpt_dir, step=20):      # in a test
        ...
    python tests/train/disk_full.py DIR STEP -- train ...   # the real CLI
"""
import errno
import os
import sys

from etils.epath import gpath


class DiskFull:
    """Writes of checkpoint `step` under `directory` fail with ENOSPC after
    half their bytes (every step's when `step` is None). `failures` counts
    the writes refused."""

    def __init__(self, directory, step=None):
        self.prefix = os.path.join(os.path.abspath(os.fspath(directory)), "")
        self.marker = None if step is None else f"/{step}.orbax-checkpoint-tmp"
        self.failures = 0
        self._saved = None

    def _full(self, path) -> bool:
        p = os.fspath(path)
        return p.startswith(self.prefix) and (self.marker is None or self.marker in p)

    def __enter__(self):
        self._saved = (gpath._GPath.write_text, gpath._GPath.write_bytes)
        write_text, write_bytes = self._saved
        disk = self

        def fail(path, data, mode):
            disk.failures += 1
            with open(os.fspath(path), mode) as f:
                f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

        def text(path, data, *args, **kwargs):
            if disk._full(path):
                fail(path, data, "w")
            return write_text(path, data, *args, **kwargs)

        def data_bytes(path, data):
            if disk._full(path):
                fail(path, bytes(data), "wb")
            return write_bytes(path, data)

        gpath._GPath.write_text, gpath._GPath.write_bytes = text, data_bytes
        return self

    def __exit__(self, *exc):
        gpath._GPath.write_text, gpath._GPath.write_bytes = self._saved


if __name__ == "__main__":
    # DIR STEP -- CLI ARGS: `cm3leon CLI ARGS` with checkpoint STEP under DIR
    # failing (the fault stays until the process exits, as a full disk does).
    directory, step, sep, *cli_args = sys.argv[1:]
    assert sep == "--"
    sys.argv = ["cm3leon", *cli_args]
    from cm3leon_jax.cli import main

    with DiskFull(directory, int(step)):
        code = main(cli_args)
    sys.exit(code)
