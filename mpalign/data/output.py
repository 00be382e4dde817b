"""Where outputs live (the dataset builder's, a training run's, a sweep's): a local folder or a prefix on object
storage (``s3://bucket/prefix``), both reached through one pyarrow filesystem, so each writer has one code path for
either; :class:`StagedFolder` serves the writers that only take a local path (TensorBoard, image files).

The one difference that matters is how a shard file is made atomic: a local file is written under a temporary name
and renamed into place; an object store's single put is atomic already (the object appears whole or not at all), so
it is written directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mpalign.config import ConfigError
from mpalign.storage import check_storage, filesystem, is_remote


class OutputFolder:
    """The output folder: ``location`` is a local path or a remote URI; ``str()`` gives it back as users wrote it
    (local paths resolved). Pickles as its location: a Ray worker opens its own filesystem from its node's settings."""

    def __init__(self, location: str | Path) -> None:
        location = str(location)
        self.local = not is_remote(location)
        if self.local:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(location).resolve())
            self.location = self.root
        else:
            self.fs, self.root = filesystem(location)
            self.location = location.rstrip("/")

    def __str__(self) -> str:
        return self.location

    def __reduce__(self):
        return OutputFolder, (self.location,)

    def check_reachable(self, what: str = "output") -> None:
        """One ConfigError within seconds when the store cannot be reached or no credentials are set (a no-op for a
        local folder): called before Ray starts."""
        check_storage(self.location, what)

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def uri(self, *parts: str) -> str:
        """Where ``parts`` is, as users write it (``s3://bucket/...`` or a local path)."""
        return "/".join((self.location, *parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def file_names(self, *parts: str) -> set[str]:
        """Names of the files directly in a subfolder (none when it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))
        return {info.base_name for info in infos if info.type == pafs.FileType.File}

    def is_empty(self) -> bool:
        return not self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))

    def visible_here(self, *parts: str) -> bool:
        """False for a local folder this process cannot see (a Ray worker on a node without the shared filesystem
        the driver created it on); object storage is reached from every node."""
        return not self.local or os.path.isdir(self.path(*parts))

    def make_folders(self, *subfolders: str) -> None:
        """Create these subfolders; with none named, the folder itself."""
        try:
            for path in [self.path(sub) for sub in subfolders] or [self.root]:
                self.fs.create_dir(path, recursive=True)
        except OSError as exc:  # e.g. a bucket that does not exist
            raise ConfigError(f"cannot write output '{self}': {' '.join(str(exc).split())[:300]}") from None

    def remove(self, *names: str) -> None:
        """Delete these files / subfolders where they exist."""
        for name in names:
            kind = self.fs.get_file_info(self.path(name)).type
            if kind == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(name))
            elif kind == pafs.FileType.File:
                self.fs.delete_file(self.path(name))

    def upload(self, local: str | Path, *parts: str) -> None:
        """Copy a local file or folder (with everything under it) to ``parts``, replacing what has the same names."""
        local = Path(local).resolve()
        if self.local:  # copy_files makes the folders of the subfolders it meets, not the destination's own
            self.fs.create_dir(self.path(*parts) if local.is_dir() else self.path(*parts).rpartition("/")[0],
                               recursive=True)
        pafs.copy_files(str(local), self.path(*parts), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self.path(name)) as stream:
            return stream.read().decode()

    def write_text(self, name: str, text: str) -> None:
        with self.fs.open_output_stream(self.path(name)) as stream:
            stream.write(text.encode())

    def write_parquet(self, table: pa.Table, *parts: str) -> None:
        """Atomically: the file exists whole or not at all."""
        path = self.path(*parts)
        if not self.local:
            pq.write_table(table, path, filesystem=self.fs, compression="zstd")
            return
        folder, _, name = path.rpartition("/")
        tmp = f"{folder}/.{name}.tmp"
        pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
        self.fs.move(tmp, path)

    def read_parquet(self, subfolder: str, columns: list[str]) -> pa.Table:
        return pq.read_table(self.path(subfolder), filesystem=self.fs, columns=columns)


class StagedFolder:
    """A local folder standing for ``location``, for writers that only take a local path (TensorBoard, image files):
    ``location`` itself when it is local, else a temporary folder whose new and changed files :meth:`sync` uploads
    there."""

    def __init__(self, location: str) -> None:
        self.remote = OutputFolder(location) if is_remote(location) else None
        self.path = Path(tempfile.mkdtemp(prefix="mpalign-staged-")) if self.remote else Path(location)
        self.uploaded: dict[str, tuple[int, int]] = {}  # name -> (size, mtime) when last uploaded

    def sync(self) -> None:
        """Upload what changed since the last sync (each sync after a validation would otherwise send every earlier
        image again)."""
        if self.remote is None:
            return
        for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
            name, stat = file.relative_to(self.path).as_posix(), file.stat()
            if self.uploaded.get(name) != (stat.st_size, stat.st_mtime_ns):
                self.remote.upload(file, name)
                self.uploaded[name] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        """The last sync; the temporary folder goes."""
        self.sync()
        if self.remote is not None:
            shutil.rmtree(self.path, ignore_errors=True)
