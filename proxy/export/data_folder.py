"""The folder of export files: their names, writing each one whole, and a sweeper for retention and a size cap.

Several instances may share one folder (every instance's data_dir on the same mount), so any
instance can serve a file another one wrote. Temporary files therefore carry the name of the
instance writing them: an instance removes its own leftovers at once, and another instance's only
when nobody has touched them for a long time (owners refresh their running exports' files).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import secrets
import socket
import threading
import time
import typing
import urllib.parse

from tornado.ioloop import IOLoop, PeriodicCallback

from proxy.metrics import DATA_FOLDER_BYTES

log = logging.getLogger(__name__)

# <topic>-<UTC time>-<32 hex chars>.csv. The random part is what keeps a file private: /data
# asks for no token, so a name must be unguessable.
EXPORT_FILE_NAME = re.compile(r"[A-Za-z0-9._-]+-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{32}\.csv")
# An export being written: .tmp-<instance id, percent-encoded>-<32 hex chars>.csv.part. The
# leading dot and the suffix keep it out of EXPORT_FILE_NAME, so /data never serves a partial
# file. Names without an instance come from versions before shared folders (sweep_temporary_files).
TEMPORARY_FILE_NAME = re.compile(r"\.tmp-(?:(?P<instance>[A-Za-z0-9._~%-]+)-)?[0-9a-f]{32}\.csv\.part")
# Another instance's temporary file is left alone until it has been untouched this long, and at
# least STALE_AFTER_SWEEPS sweep intervals: its owner refreshes the files of running exports on
# every sweep, and clocks of hosts sharing a network mount may disagree by a minute or two.
STALE_AFTER_SECONDS = 600.0
STALE_AFTER_SWEEPS = 5


def is_export_file_name(name: str) -> bool:
    """Whether name is a finished export file (the only names /data serves)."""
    return EXPORT_FILE_NAME.fullmatch(name) is not None


class DataFolder:
    """The data folder: names new export files and deletes old ones (retention, size cap)."""

    def __init__(self, path: str, retention_seconds: float, max_bytes: int):
        self.path = path
        self.retention_seconds = retention_seconds
        self.max_bytes = max_bytes
        # start() names the instance; until then (unit tests), the host.
        self.instance_id = socket.gethostname()
        self.stale_after = STALE_AFTER_SECONDS
        self._periodic: PeriodicCallback | None = None
        self._sweeping = False
        # Temporary files of this instance's running exports, by path. Export threads add and
        # remove them, the sweeper (on another thread) reads them.
        self._writing: set[str] = set()
        self._writing_lock = threading.Lock()

    def new_export_name(self, label: str) -> str:
        """A fresh, unguessable export file name; label is the topic (or "all")."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return f"{label}-{now}-{secrets.token_hex(16)}.csv"

    def new_temporary_path(self) -> str:
        """A fresh temporary file name that says which instance writes it."""
        tag = urllib.parse.quote(self.instance_id, safe="")
        return os.path.join(self.path, f".tmp-{tag}-{secrets.token_hex(16)}.csv.part")

    def new_export_file(self, label: str) -> ExportFile:
        """A new export file, written under a temporary name; a context manager giving the open file."""
        return ExportFile(self, label)

    def export_files(self) -> list[tuple[str, float, int]]:
        """(name, mtime, size) of every finished export file, oldest first."""
        files = []
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not is_export_file_name(entry.name):
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted meanwhile by another sweep
                continue
            files.append((entry.name, stat.st_mtime, stat.st_size))
        files.sort(key=lambda file: (file[1], file[0]))
        return files

    def total_bytes(self) -> int:
        return sum(size for _, _, size in self.export_files())

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete files older than the retention, then the oldest while over max_bytes, then crash
        leftovers (sweep_temporary_files); return their names.

        The newest file is never deleted for size, so a URL just handed out stays valid.
        """
        now = time.time() if now is None else now
        files = self.export_files()
        expired = [file for file in files if now - file[1] > self.retention_seconds]
        kept = [file for file in files if now - file[1] <= self.retention_seconds]
        total = sum(size for _, _, size in kept)
        oversize = []
        while total > self.max_bytes and len(kept) > 1:
            oldest = kept.pop(0)
            oversize.append(oldest)
            total -= oldest[2]
        removed = [name for name, _, _ in expired + oversize if self._remove(name)]
        if removed:
            log.info("data folder sweep removed %d file(s) (%d expired, %d over the size cap), %d bytes left",
                     len(removed), len(expired), len(oversize), total)
        DATA_FOLDER_BYTES.set(total)
        return removed + self.sweep_temporary_files(now)

    def sweep_temporary_files(self, now: float | None = None, starting: bool = False) -> list[str]:
        """Delete the partial files crashed exports left behind; return their names.

        This instance's own are deleted unless one of its exports is writing them; another
        instance's only once untouched for stale_after seconds, so a running export elsewhere
        keeps its file. The files of this instance's running exports are touched, which is
        what tells the other instances they are alive (an export that filters out most rows
        may not write for minutes).
        """
        now = time.time() if now is None else now
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []
        # Taken after the listing: an export registers its file before creating it, so every
        # file of ours that was listed is either in this set or already finished.
        with self._writing_lock:
            writing = set(self._writing)
        for path in writing:
            try:
                os.utime(path)
            except FileNotFoundError:
                pass  # finished meanwhile
        own, stale = [], []
        for entry in entries:
            match = TEMPORARY_FILE_NAME.fullmatch(entry.name)
            if match is None or entry.path in writing:
                continue
            tag = match.group("instance")
            # A name without an instance was written by a version that did not share folders, so
            # by this deployment's previous run: removed at start-up as that version did.
            if (tag is None and starting) or (tag is not None and urllib.parse.unquote(tag) == self.instance_id):
                own.append(entry.name)
                continue
            try:
                untouched = now - entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:  # finished, or removed by another instance's sweep
                continue
            if untouched > self.stale_after:
                stale.append(entry.name)
        removed_own = [name for name in own if self._remove(name)]
        removed_stale = [name for name in stale if self._remove(name)]
        if removed_own or removed_stale:
            log.info("removed %d temporary export file(s) of this instance (%s) left by a crash or an earlier run, "
                     "%d of other instances untouched for over %.0f s",
                     len(removed_own), self.instance_id, len(removed_stale), self.stale_after)
        return removed_own + removed_stale

    def start(self, interval: float, instance_id: str | None = None) -> None:
        """At start-up, before serving: create the folder, clean it, then sweep every interval seconds.

        instance_id: unique among the instances sharing this folder; it tags this instance's
        temporary files (default: the host name).
        """
        if instance_id is not None:
            self.instance_id = instance_id
        self.stale_after = max(STALE_AFTER_SECONDS, STALE_AFTER_SWEEPS * interval)
        os.makedirs(self.path, exist_ok=True)
        self.sweep_temporary_files(starting=True)
        self.sweep()
        self._periodic = PeriodicCallback(self._sweep_in_background, interval * 1000)
        self._periodic.start()

    def stop(self) -> None:
        if self._periodic is not None:
            self._periodic.stop()
            self._periodic = None

    async def _sweep_in_background(self) -> None:
        # Listing and deleting files blocks, so it runs off the IOLoop thread.
        if self._sweeping:
            return
        self._sweeping = True
        try:
            await IOLoop.current().run_in_executor(None, self.sweep)
        except OSError:
            log.exception("data folder sweep failed")
        finally:
            self._sweeping = False

    def started_writing(self, temporary_path: str) -> None:
        with self._writing_lock:
            self._writing.add(temporary_path)

    def stopped_writing(self, temporary_path: str) -> None:
        with self._writing_lock:
            self._writing.discard(temporary_path)

    def _remove(self, name: str) -> bool:
        try:
            os.remove(os.path.join(self.path, name))
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("cannot delete %s from the data folder: %s", name, exc.strerror)
            return False


class ExportFile:
    """A temporary file in the data folder that becomes an export file only once it is complete."""

    def __init__(self, folder: DataFolder, label: str):
        self.folder = folder
        self.name = folder.new_export_name(label)
        self.temporary_path = folder.new_temporary_path()
        self.size = 0
        self._file: typing.TextIO | None = None

    def __enter__(self) -> typing.TextIO:
        os.makedirs(self.folder.path, exist_ok=True)
        # Registered before it exists and until it is gone, so this instance's sweeper never
        # takes it for a crash leftover.
        self.folder.started_writing(self.temporary_path)
        try:
            self._file = open(self.temporary_path, "x", encoding="utf-8", newline="", buffering=1 << 16)
        except BaseException:
            self.folder.stopped_writing(self.temporary_path)
            raise
        return self._file

    def __exit__(self, exc_type: type[BaseException] | None, *_: typing.Any) -> None:
        assert self._file is not None
        if exc_type is not None:
            self._discard()
            return
        try:
            self._file.flush()
            # On disk before it gets its served name, so a crash never leaves a truncated export.
            os.fsync(self._file.fileno())
            self.size = os.fstat(self._file.fileno()).st_size
            self._file.close()
            os.replace(self.temporary_path, os.path.join(self.folder.path, self.name))
        except BaseException:
            self._discard()
            raise
        self.folder.stopped_writing(self.temporary_path)
        _fsync_directory(self.folder.path)

    def _discard(self) -> None:
        assert self._file is not None
        try:
            self._file.close()
        except OSError:
            pass  # e.g. the disk is full: the file goes anyway
        try:
            os.remove(self.temporary_path)
        except FileNotFoundError:
            pass
        self.folder.stopped_writing(self.temporary_path)


def _fsync_directory(path: str) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # not supported for directories on every file system
    finally:
        os.close(descriptor)
