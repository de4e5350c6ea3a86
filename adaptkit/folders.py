"""The one writer of adapter folders (:func:`commit`), by the rules docs/folder-format.md lists: built aside and
swapped in with one ``renameat2`` exchange; the manifest's sha256s tell adaptkit's files from the user's, which are
carried over as hard links (symlinks as links, never written through)."""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from adaptkit.errors import AdapterFormatError, ConfigError, ConfigTypeError
from adaptkit.names import CONFIG_NAME, FORMAT

MARK = ".adaptkit-temp"  # inside every temporary folder adaptkit makes; a look-alike without it is the user's
# what from_pretrained (transformers, PEFT) reads from a folder's top level
LOADED_FILES = {"config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}
def read_json(path: Path, max_bytes: int = 16 << 20) -> Any:
    """A JSON file someone else may have written: unreadable, not UTF-8, huge or deeply nested is a typed error."""
    try:
        if path.stat().st_size > max_bytes:
            raise ValueError(f"{path.stat().st_size} bytes, more than a config holds")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise AdapterFormatError(str(path), type(exc).__name__, f"cannot be read: {exc}"[:300],
                                 "restore it from a good copy") from None


def write_json(path: Path, data: Any) -> None:
    write_text(Path(path), json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write atomically (a reader sees the old file or the new one), keeping the mode, never through a symlink."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)  # O_EXCL: a planted link is not followed
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if path.exists() and not path.is_symlink():
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    os.replace(tmp, path)  # replaces a symlink itself, not what it points at


def digest(path: Path) -> str | None:
    if path.is_file() and not path.is_symlink():
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    return None


def files_under(folder: Path) -> list[str]:
    """Every file or symlink below ``folder`` (symlinked folders are not entered), as sorted POSIX paths."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / f).as_posix() for f in files]
        out += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(out)


def owned_files(folder: Path) -> set[str]:
    """The files of ``folder`` adaptkit can prove it wrote: listed in the manifest with the digest they still have."""
    try:
        data = read_json(folder / CONFIG_NAME)
        files = data.get("files") if data.get("format") == FORMAT else None
    except (AdapterFormatError, AttributeError):
        return set()
    if not isinstance(files, dict):  # a manifest of names only (the first format) proves nothing
        return {CONFIG_NAME} if isinstance(files, list) else set()
    return {CONFIG_NAME} | {r for r, d in files.items() if r and ".." not in Path(r).parts and not Path(r).is_absolute()
                            and digest(folder / r) == d}


def record(folder: Path, rel: str) -> None:
    """After changing an adaptkit-written file in place (the card's training section): its new digest."""
    data = read_json(folder / CONFIG_NAME)
    if isinstance(data.get("files"), dict):
        data["files"][rel] = digest(folder / rel)
        write_json(folder / CONFIG_NAME, data)


def path_of(directory: Any, field: str = "directory") -> Path:
    """A folder path the user typed, ``~`` expanded; anything else is a typed error naming the argument."""
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise ConfigTypeError(field, directory, f"expected a folder path, got {type(directory).__name__}",
                              f"pass a str or Path, e.g. {field}='out/adapter'")
    return Path(os.path.expanduser(os.fspath(directory)))


def commit(directory: Any, build: Callable[[Path], dict[str, Any]], field: str = "directory") -> Path:
    """Write an adapter folder at ``directory``: ``build(folder)`` writes the files into an empty folder and
    returns adaptkit_config.json's contents, which get the manifest and are written last."""
    try:
        target = path_of(directory, field).resolve()  # a symlinked folder is followed (the link stays)
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except (OSError, RuntimeError) as exc:  # a file on the way, a symlink loop, /proc, a read-only parent
        raise ConfigError(field, str(directory), f"cannot hold an adapter folder: {getattr(exc, 'strerror', 0) or exc}",
                          "pass a new or adapter folder you can write") from None
    (work / MARK).write_text(str(target))
    new = work / "folder"
    try:
        new.mkdir()
        meta = build(new)
        meta["files"] = {rel: digest(new / rel) for rel in files_under(new)}
        write_json(new / CONFIG_NAME, meta)
        _swap(new, target, set(meta["files"]) | {CONFIG_NAME}, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _swap(new: Path, target: Path, written: set[str], work: Path) -> None:
    for _ in range(5):  # a concurrent saver may create or swap the target between our steps
        if not target.exists():
            try:
                os.rename(new, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue  # another save created it first: carry its user files over, then swap
        owned = owned_files(target)
        _carry_over(target, new, owned, written)
        cwd = os.getcwd() if os.path.isdir(".") else None
        cwd = cwd if cwd and (Path(cwd) == target or target in Path(cwd).parents) else None
        if _exchange(new, target):
            old = new  # the temporary name now holds the previous folder
        else:
            try:
                os.rename(target, work / "previous")
            except FileNotFoundError:  # a concurrent save moved it first
                continue
            os.rename(new, target)
            old = work / "previous"
        if cwd is not None:  # the process stood in the old folder; stand in the new one at the same path
            os.chdir(cwd)
        _carry_over(old, target, owned, written, move=True)  # what the user wrote there while this save ran
        os.chmod(old, 0o700)
        return
    raise ConfigError("directory", str(target), "kept changing while saving", "let one process save to it at a time")


def _carry_over(src: Path, dst: Path, owned: set[str], written: set[str], move: bool = False) -> None:
    """Recreate in ``dst`` every entry of ``src`` adaptkit cannot prove it wrote (hard links, a copy where the
    filesystem has none, a rename when ``move``), with modes and times; refuse what the new save would replace
    or leave beside it for from_pretrained to read."""
    for rel in files_under(src):
        a, b = src / rel, dst / rel
        if rel in owned:
            if b.exists() and not move:
                os.chmod(b, stat.S_IMODE(a.stat().st_mode))  # a file adaptkit rewrites keeps its mode
            continue
        if not move and (rel in written or rel in LOADED_FILES) and not (b.exists() and os.path.samefile(a, b)):
            what = "the new save writes a file of that name" if rel in written else \
                "left beside the new adapter, from_pretrained would load it with it"
            raise ConfigError("directory", str(a), f"is a file adaptkit did not write (or changed since); {what}",
                              "move or rename that file, or save into another folder")
        if b.exists() or b.is_symlink():  # linked on an earlier try, or the new save's (when moving)
            continue
        b.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.rename(a, b)
        elif a.is_symlink():
            os.symlink(os.readlink(a), b)
        else:
            try:
                os.link(a, b, follow_symlinks=False)
            except OSError:
                shutil.copy2(a, b, follow_symlinks=False)
    if move:
        return
    for root, dirs, _ in os.walk(src, topdown=False):  # the user's folders, empty ones too, as they were
        for d in dirs:
            a = Path(root) / d
            if not a.is_symlink():
                (dst / a.relative_to(src)).mkdir(parents=True, exist_ok=True)
                shutil.copystat(a, dst / a.relative_to(src))
    os.chmod(dst, stat.S_IMODE(src.stat().st_mode))  # 0700, 2775, 0555 stay what they were


def remove_stale_temps(target: Path) -> None:
    """Remove temporary folders of earlier saves to ``target`` (with adaptkit's marker) whose process is gone."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        pid, mark = path.name[len(target.name) + 6:].split("-")[0], path / MARK
        ours = pid.isdigit() and not path.is_symlink() and mark.is_file() and not mark.is_symlink()
        if ours and not _alive(int(pid)):
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return True


def replace_dir(src: Path, dst: Path) -> None:
    """Replace all of ``dst`` with the finished folder ``src`` (a recipe's checkpoint), atomically where possible."""
    if dst.exists() and _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # ``src`` now holds the old folder
        return
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        dst.rename(old / "previous")
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE): ``b`` is never missing; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    return rename is not None and rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
