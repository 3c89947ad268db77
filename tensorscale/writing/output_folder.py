"""The output folder's life: a temporary folder beside OUT, filled, then renamed into place.

A run that fails or is killed never leaves a partial OUT: everything is written into
``.<OUT name>.tensorscale-tmp-<pid>-<random>`` next to OUT and renamed only when complete. With ``--force``
an existing OUT is replaced only after the new one is complete, and only if it may be replaced at all
(replace_guard). Liveness is a kernel lock, not a PID: each run holds an flock on its
``.<OUT name>.tensorscale-lock-<pid>-<random>`` file, which the kernel releases when the run dies (PIDs
repeat across PID namespaces: two containers are both PID 1). Leftover temporary folders whose lock is free
are removed by the next run for the same OUT.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import tempfile

from .. import interrupts
from ..errors import TensorscaleError
from ..reading.cache_layout import allowed_root, link_allowed
from ..reading.source import INDEX_NAME, PICKLE_SUFFIXES
from .replace_guard import MANIFEST_NAME, check_replaceable

TMP_MARKER = ".tensorscale-tmp-"
LOCK_MARKER = ".tensorscale-lock-"
RESERVE_FILE = ".tensorscale-reserved"
# Files of the source model that are not carried over: weights and config are rewritten, and pickles,
# model cards, VCS files and the source's own manifest (another command, other hashes) do not describe
# the new model.
SKIP_SUFFIXES = (".safetensors", ".md", ".gitattributes", *PICKLE_SUFFIXES)
SKIP_NAMES = {"config.json", INDEX_NAME, MANIFEST_NAME}

# Outputs this process has moved into place: an interrupt after that must not say "nothing was written".
_COMMITTED: list[tuple[str, bool]] = []


def committed_outputs() -> list[tuple[str, bool]]:
    """(OUT, replaced an old OUT) for every output this process has completed, in order. A temporary folder
    of ours (the checkpoint that `--format gguf` converts, gguf_export.py) is not an output: it is removed."""
    return [(out, replaced) for out, replaced in _COMMITTED if TMP_MARKER not in os.path.basename(out)]


def record_committed(output: str, replaced: bool) -> None:
    """For an output moved into place by other code than OutputFolder.commit (a GGUF file)."""
    _COMMITTED.append((output, replaced))


def check_output_path(output: str, source_folder: str | None, force: bool, extra_kept: tuple[str, ...] = ()) -> str:
    """OUT as an absolute path, after every check that can refuse it; call before any work."""
    if "\0" in output:
        raise TensorscaleError("the output path contains a NUL character; choose another --output")
    out = os.path.abspath(output)
    if source_folder is not None:
        src = os.path.realpath(source_folder)
        real_out = os.path.realpath(out)
        if real_out == src or os.path.commonpath([src, real_out]) == src:
            raise TensorscaleError(
                f"output {output} is the input folder or file, or inside it; choose another --output"
            )
    if os.path.lexists(out) and not force:
        raise TensorscaleError(f"output {output} already exists; pass --force to replace it or choose another --output")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise TensorscaleError(f"output {output} exists and is not a folder; remove it or choose another --output")
    if os.path.lexists(out):
        check_replaceable(out, source_folder, extra_kept)
    parent = os.path.dirname(out) or "."
    if not os.path.isdir(parent):
        raise TensorscaleError(f"the folder {parent} for the output does not exist; create it first")
    return out


def _remove_path(path: str) -> None:
    """A folder with everything in it, or a link (never what the link points to)."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        try:
            os.unlink(path)
        except OSError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


def _lock_is_free(path: str) -> bool:
    """True when no live process holds the flock on `path` (or the file is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return True
    finally:
        os.close(fd)
    return True


class OutputFolder:
    def __init__(self, output: str):
        self.output = output
        self.parent = os.path.dirname(output)
        self.base = os.path.basename(output)
        self.stale_removed = self._remove_stale()
        self.run_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp = os.path.join(self.parent, f".{self.base}{TMP_MARKER}{self.run_id}")
        self.lock_path = os.path.join(self.parent, f".{self.base}{LOCK_MARKER}{self.run_id}")
        self._lock_fd: int | None = None

    def create(self) -> None:
        """Take our lock, then make the temporary folder. Call inside the try whose failure path calls abort()."""
        try:
            self._take_lock()
            os.mkdir(self.tmp)  # mode 0o777 & ~umask
        except OSError as exc:
            raise TensorscaleError(f"cannot create a temporary folder in {self.parent}: {exc.strerror}") from None

    def _take_lock(self) -> None:
        """Create the lock file under a private name, lock it, then rename it into place: another run never
        sees our lock file unlocked."""
        private = os.path.join(self.parent, f".{self.base}.tensorscale-newlock-{self.run_id}")
        fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, str(os.getpid()).encode())
            os.rename(private, self.lock_path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(private)
            except OSError:
                pass
            raise
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_stale(self) -> list[str]:
        """Remove temporary folders (and lock files) of dead runs for this OUT; refuse if one is alive."""
        removed = []
        tmp_prefix, lock_prefix = f".{self.base}{TMP_MARKER}", f".{self.base}{LOCK_MARKER}"
        try:
            names = os.listdir(self.parent)
        except OSError:
            return removed
        runs: dict[str, list[str]] = {}
        for name in names:
            if name.startswith(tmp_prefix):
                run = name[len(tmp_prefix) :]
                run = run[: -len("-old")] if run.endswith("-old") else run
                runs.setdefault(run, []).append(name)
            elif name.startswith(lock_prefix):
                runs.setdefault(name[len(lock_prefix) :], [])
        for run, folders in sorted(runs.items()):
            lock = os.path.join(self.parent, lock_prefix + run)
            if os.path.lexists(lock) and not _lock_is_free(lock):
                where = os.path.join(self.parent, folders[0]) if folders else lock
                raise TensorscaleError(
                    f"another tensorscale run (pid {run.split('-')[0]}, maybe in another container) is writing "
                    f"{self.output}; wait for it to finish (its temporary folder is {where})"
                )
            for name in folders:
                _remove_path(os.path.join(self.parent, name))
                removed.append(name)
            if os.path.lexists(lock):
                try:
                    os.unlink(lock)
                except OSError:
                    pass
        return removed

    def path(self, filename: str) -> str:
        return os.path.join(self.tmp, filename)

    def write_json(self, filename: str, data) -> None:
        try:
            with open(self.path(filename), "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2, sort_keys=filename == "config.json")
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise TensorscaleError(f"cannot write {filename}: {exc.strerror} (is the disk full?)") from None

    def write_text(self, filename: str, text: str) -> None:
        try:
            with open(self.path(filename), "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise TensorscaleError(f"cannot write {filename}: {exc.strerror} (is the disk full?)") from None

    def copy_side_files(self, source_folder: str) -> list[str]:
        """Tokenizer, generation config and other small files that describe the model unchanged.

        A link is followed only where it stays inside the model folder, or, for a hub-cache snapshot, inside
        its repo folder (reading.cache_layout); a file named `token` is never read."""
        copied = []
        root = allowed_root(source_folder)
        for name in sorted(os.listdir(source_folder)):
            source = os.path.join(source_folder, name)
            if name in SKIP_NAMES or name.endswith(SKIP_SUFFIXES) or name.startswith("."):
                continue
            try:
                mode = os.stat(source).st_mode
            except OSError:
                continue
            if not stat.S_ISREG(mode):
                continue
            if not link_allowed(source, root):
                continue
            try:
                shutil.copyfile(source, self.path(name))
            except OSError as exc:
                raise TensorscaleError(f"cannot copy {name}: {exc.strerror} (is the disk full?)") from None
            copied.append(name)
        return copied

    def commit(self) -> None:
        """Move the finished temporary folder to OUT, replacing an old OUT only now.

        An existing OUT is swapped with the new folder in one atomic step (renameat2 RENAME_EXCHANGE), so
        at every instant OUT is either the old complete folder or the new one; the old one then sits under
        our temporary name and is deleted (or, if we are killed first, cleaned by the next run). A symlink
        OUT is replaced as a link: the folder it pointed to is left alone. A signal that came before (its
        KeyboardInterrupt may have been swallowed) stops the run here; one that comes during the swap waits
        until OUT and the record of it agree (interrupts.py), so the interrupt's message tells the truth.
        """
        interrupts.check()
        with interrupts.deferred():
            self._move_into_place()

    def _move_into_place(self) -> None:
        reserved = self.path(RESERVE_FILE)
        if os.path.lexists(reserved):
            os.remove(reserved)
        if os.path.lexists(self.output):
            if _exchange(self.tmp, self.output):
                _COMMITTED.append((self.output, True))
                _remove_path(self.tmp)
            else:  # no renameat2 (not Linux, or an old filesystem): the old OUT is briefly under a side name
                old = self.tmp + "-old"
                os.rename(self.output, old)
                os.rename(self.tmp, self.output)
                _COMMITTED.append((self.output, True))
                _remove_path(old)
        else:
            os.rename(self.tmp, self.output)
            _COMMITTED.append((self.output, False))
        _fsync_dir(self.parent)
        self._release_lock()

    def abort(self) -> None:
        """Remove the temporary folder (after a swap: the old OUT) and our lock, not cut short by a signal."""
        with interrupts.deferred():
            if os.path.lexists(self.tmp):
                _remove_path(self.tmp)
            self._release_lock()

    def reserve(self, nbytes: int) -> None:
        """Claim the whole output's size on the disk before the first write (each shard then takes its share
        back, release_reservation), so a full disk fails at once, not after hours."""
        reserve_space(self.tmp, nbytes)

    def drop_reservation(self) -> None:
        """What is left of the reservation (the header allowance) goes before the small files are written."""
        try:
            os.remove(self.path(RESERVE_FILE))
        except OSError:
            pass


def reserve_space(folder: str, nbytes: int) -> None:
    path = os.path.join(folder, RESERVE_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if nbytes > 0:
            os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        free = _free_bytes(folder)
        have = f", {free / 1e9:.2f} GB free" if free is not None else ""
        raise TensorscaleError(
            f"cannot reserve {nbytes / 1e9:.2f} GB for the output in {os.path.dirname(folder)}"
            f"{have}: {exc.strerror} (is the disk full?)"
        ) from None
    except AttributeError:
        pass
    finally:
        os.close(fd)


def release_reservation(folder: str, nbytes: int) -> None:
    """Give `nbytes` of the whole-output reservation back, just before a shard of that size claims them
    (workers in other processes do this too, so the file is locked while it shrinks)."""
    path = os.path.join(folder, RESERVE_FILE)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - nbytes))
    except OSError:
        pass
    finally:
        os.close(fd)


def _free_bytes(folder: str) -> int | None:
    try:
        status = os.statvfs(folder)
    except OSError:
        return None
    return status.f_bavail * status.f_frsize


def _exchange(first: str, second: str) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return result == 0


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


SPILL_MARKER = ".tensorscale-refit-"


class SpillWorkspace:
    """A temporary folder for `down`'s refitted tensors, beside OUT (the same disk), removed when closed.

    Like OUT's temporary folder it lives under a kernel lock (`<folder>.lock`, taken before the folder is
    made and released when the process dies), so a run killed with SIGKILL, which runs no cleanup, leaves
    a folder that the next `down` beside it removes; a live run's folder is never touched."""

    def __init__(self, output: str | None):
        parent = os.path.dirname(os.path.abspath(output)) if output else os.getcwd()
        self.parent = parent if os.path.isdir(parent) else tempfile.gettempdir()
        self.folder = os.path.join(self.parent, f"{SPILL_MARKER}{os.getpid()}-{secrets.token_hex(4)}")
        self._lock_fd: int | None = None

    def open(self) -> str:
        remove_stale_spills(self.parent)
        lock, private = f"{self.folder}.lock", f"{self.folder}.newlock"
        fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(private, lock)  # another run never sees this lock file unlocked
            os.mkdir(self.folder)
        except BaseException:
            os.close(fd)
            for path in (private, lock):
                if os.path.lexists(path):
                    os.unlink(path)
            raise
        self._lock_fd = fd
        return self.folder

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock_fd is not None:
            try:
                os.unlink(f"{self.folder}.lock")
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> str:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def remove_stale_spills(parent: str) -> list[str]:
    """Remove the refit workspaces (and their lock files) in `parent` whose run is dead."""
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        if not name.startswith(SPILL_MARKER) or name.endswith((".lock", ".newlock")):
            continue
        lock = os.path.join(parent, f"{name}.lock")
        if os.path.lexists(lock) and not _lock_is_free(lock):
            continue  # a live run's
        _remove_path(os.path.join(parent, name))
        removed.append(name)
        if os.path.lexists(lock):
            os.unlink(lock)
    for name in names:  # locks whose folder is gone, and private locks a kill left before their rename
        path = os.path.join(parent, name)
        if (
            name.startswith(SPILL_MARKER)
            and name.endswith((".lock", ".newlock"))
            and os.path.lexists(path)
            and _lock_is_free(path)
        ):
            try:
                os.unlink(path)
            except OSError:
                pass
    return removed
