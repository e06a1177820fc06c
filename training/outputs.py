"""Output folders of the training commands: checked before work, claimed, kept tidy.

* :func:`check_writable_folder` proves, before the first training step, that a folder
  exists and takes files, or can be created, without leaving anything behind.
* :class:`RunClaim` claims a training run folder for one process (an OS file lock held
  for the whole run, released even by ``kill -9``), so two runs never share one.
* :func:`remove_stale_temporaries` deletes the hidden ``.NAME.*.tmp`` files that
  :func:`napari_lvunet.io.atomic_write` leaves when a process dies mid-write.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "LOCK_NAME",
    "OutputError",
    "RunClaim",
    "RunFolderBusy",
    "check_writable_folder",
    "remove_stale_temporaries",
]

logger = logging.getLogger(__name__)

#: The lock file inside a run folder while a process trains in it.
LOCK_NAME = ".lvunet-train.lock"


class OutputError(ValueError):
    """An output folder cannot be written; the message names it and says why."""


class RunFolderBusy(OutputError):  # noqa: N818 - reads as what happened
    """Another process is training in the run folder."""


def check_writable_folder(folder: str | Path, what: str = "output folder") -> None:
    """Raise :class:`OutputError` unless ``folder`` takes new files or can be created.

    An existing folder must accept a new file; a missing one needs its nearest existing
    ancestor to be a folder that accepts a new sub-folder. Both are tried for real (a
    probe file or folder, removed at once), which also catches read-only mounts and
    permission rules that :func:`os.access` does not see. Nothing is created.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise OutputError(f"the {what} {folder} is a file, not a folder")
        _probe(folder, what, folder, make_dir=False)
        return
    ancestor = folder.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create the {what} {folder}: {ancestor} is a file")
    _probe(ancestor, what, folder, make_dir=True)


def _probe(where: Path, what: str, folder: Path, *, make_dir: bool) -> None:
    probe = where / f".lvunet-write-test-{secrets.token_hex(4)}"
    try:
        if make_dir:
            probe.mkdir()
            probe.rmdir()
        else:
            probe.open("xb").close()
            probe.unlink()
    except OSError as err:
        verb = "create" if make_dir else "write to"
        reason = err.strerror or str(err)
        raise OutputError(f"cannot {verb} the {what} {folder}: {reason}") from None


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete ``.NAME.<hex>.tmp`` files that a killed process left for these names.

    Only the temporary files of :func:`napari_lvunet.io.atomic_write` for the given file
    names are touched, never anything else in the folder. Call it only while holding
    the folder (:class:`RunClaim`): a live writer's temporary file looks the same.

    Returns:
        The files removed.
    """
    folder = Path(folder)
    removed = []
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp"):
            token = tmp.name[len(name) + 2 : -len(".tmp")]
            if len(token) == 8 and all(c in "0123456789abcdef" for c in token):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    if removed:
        logger.warning(
            "removed %d unfinished temporary file(s) of an earlier, interrupted process: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


class RunClaim:
    """An exclusive claim on a run folder for as long as this process trains in it.

    The claim is an OS lock (``flock`` / ``LockFileEx``) on ``LOCK_NAME`` inside the
    folder: the kernel releases it when the process ends in any way, so a crash or
    ``kill -9`` never leaves a folder claimed. :meth:`acquire` creates the folder if
    needed; :meth:`release` removes the lock file, and the folder (with the parents it
    had to create) when this claim created it and nothing else was written: a failed
    run leaves no empty folder.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.lock_path = self.folder / LOCK_NAME
        self._created: list[Path] = []
        self._fd: int | None = None

    def acquire(self) -> RunClaim:
        """Create the folder if needed and lock it.

        Raises:
            RunFolderBusy: If another process holds the folder.
            OutputError: If the folder cannot be created or written.
        """
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True)
            self._created = missing  # deepest first
        except FileExistsError:
            if not self.folder.is_dir():
                raise OutputError(f"the run folder {self.folder} is a file") from None
        except OSError as err:
            raise OutputError(
                f"cannot create the run folder {self.folder}: {err.strerror or err}"
            ) from None
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                self._drop_created()
                raise OutputError(
                    f"cannot write to the run folder {self.folder}: {err.strerror or err}"
                ) from None
            if not _try_lock(fd):
                os.close(fd)
                raise RunFolderBusy(
                    f"another training process is using the run folder {self.folder}; "
                    "wait for it to finish or choose another --out"
                )
            # The holder before us may have removed the lock file after we opened it:
            # then our lock is on a dead file; take the one now at the path instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        """Give the folder up (see the class docstring); safe to call twice."""
        if self._fd is None:
            return
        self.lock_path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        self._drop_created()

    @property
    def created(self) -> bool:
        """Whether this claim created the folder."""
        return bool(self._created)

    def _drop_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only if empty: never deletes what a run wrote
            except OSError:
                break
        self._created = []

    def __enter__(self) -> RunClaim:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
