"""The output folder's life: a temporary folder beside OUT, filled, then renamed into place.

A run that fails or is killed never leaves a partial OUT: everything is written into
``.<OUT name>.tensorscale-tmp-<pid>`` next to OUT and renamed only when complete. With ``--force`` an
existing OUT is replaced only after the new one is complete. Leftover temporary folders of dead runs are
removed by the next run for the same OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

from ..errors import TensorscaleError
from ..reading.cache_layout import allowed_root, link_allowed
from ..reading.source import INDEX_NAME, PICKLE_SUFFIXES

TMP_MARKER = ".tensorscale-tmp-"
OWNER_FILE = ".tensorscale-owner"
# Files of the source model that are not carried over: weights and config are rewritten, and pickles,
# model cards and VCS files do not describe the new model.
SKIP_SUFFIXES = (".safetensors", ".md", ".gitattributes", *PICKLE_SUFFIXES)
SKIP_NAMES = {"config.json", INDEX_NAME}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_path(output: str, source_folder: str | None, force: bool) -> str:
    out = os.path.abspath(output)
    if source_folder is not None:
        src = os.path.realpath(source_folder)
        real_out = os.path.realpath(out)
        if real_out == src or os.path.commonpath([src, real_out]) == src:
            raise TensorscaleError(f"output {output} is the input folder or inside it; choose another --output")
    if os.path.lexists(out) and not force:
        raise TensorscaleError(f"output {output} already exists; pass --force to replace it or choose another --output")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise TensorscaleError(f"output {output} exists and is not a folder; remove it or choose another --output")
    parent = os.path.dirname(out) or "."
    if not os.path.isdir(parent):
        raise TensorscaleError(f"the folder {parent} for the output does not exist; create it first")
    return out


class OutputFolder:
    def __init__(self, output: str):
        self.output = output
        self.parent = os.path.dirname(output)
        self.base = os.path.basename(output)
        self.stale_removed = self._remove_stale()
        self.tmp = os.path.join(self.parent, f".{self.base}{TMP_MARKER}{os.getpid()}")

    def create(self) -> None:
        """Make the temporary folder. Call inside the try whose failure path calls abort()."""
        if os.path.lexists(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            os.mkdir(self.tmp)  # mode 0o777 & ~umask
            with open(os.path.join(self.tmp, OWNER_FILE), "w") as handle:
                handle.write(str(os.getpid()))
        except OSError as exc:
            raise TensorscaleError(f"cannot create a temporary folder in {self.parent}: {exc.strerror}") from None

    def _remove_stale(self) -> list[str]:
        removed = []
        prefix = f".{self.base}{TMP_MARKER}"
        try:
            names = os.listdir(self.parent)
        except OSError:
            return removed
        for name in names:
            if not name.startswith(prefix):
                continue
            try:
                pid = int(name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if pid == os.getpid():
                continue
            if _pid_alive(pid):
                raise TensorscaleError(
                    f"another tensorscale run (pid {pid}) is writing {self.output}; wait for it, "
                    f"or remove {os.path.join(self.parent, name)} if that process is not tensorscale"
                )
            shutil.rmtree(os.path.join(self.parent, name), ignore_errors=True)
            removed.append(name)
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
        our temporary name and is deleted (or, if we are killed first, cleaned by the next run).
        """
        os.remove(self.path(OWNER_FILE))
        if os.path.lexists(self.output):
            if _exchange(self.tmp, self.output):
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:  # no renameat2 (not Linux, or an old filesystem): the old OUT is briefly under a side name
                old = os.path.join(self.parent, f".{self.base}{TMP_MARKER}{os.getpid()}-old")
                os.rename(self.output, old)
                os.rename(self.tmp, self.output)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.output)
        _fsync_dir(self.parent)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


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
