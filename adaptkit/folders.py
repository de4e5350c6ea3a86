"""Writing a folder of files atomically without touching the files adaptkit did not write.

``adaptkit.save`` builds its files in a temporary folder beside the target, then swaps that folder
into place in one step, so a crash leaves either the previous folder or the new one, never a mix.
A target folder may also hold the user's own files (a tokenizer, notes, evaluation results): each
save records the files it wrote (its manifest), and everything else in the old folder is carried
into the new one as hard links before the swap, so the swap replaces only adaptkit's files.

Temporary folders are named ``.<name>.tmp-<pid>-<random>``; one whose process is gone was left by
a killed save and is removed by the next save to the same target. One file is written the same way
(:func:`write_json`: a temporary name, then a rename).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from adaptkit.errors import ConfigError


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def resolve_target(directory: str | Path) -> Path:
    """The real folder a save should write: ``~`` expanded, ``.`` made absolute, a symlink followed
    (the link stays and points at the new folder)."""
    return Path(os.path.expanduser(os.fspath(directory))).resolve()


def make_temp(target: Path) -> Path:
    """A fresh temporary folder beside ``target`` (same filesystem, so renames are atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove temporary folders of earlier saves to ``target`` whose process no longer runs."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-[^/]+")
    removed = []
    for path in target.parent.glob(f".{glob_escape(target.name)}.tmp-*"):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def files_under(folder: Path) -> list[str]:
    """Every file (or symlink) below ``folder``, as sorted POSIX paths relative to it."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / f).as_posix() for f in files]
        out += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(out)


def replace_owned(new: Path, target: Path, owned: Callable[[], Iterable[str]]) -> None:
    """Put the finished folder ``new`` at ``target``, keeping every entry of an old ``target`` that is
    not in ``owned()`` (the old folder's manifest, read again whenever a concurrent save changed the
    folder). Refuses, before changing anything, when the new folder would overwrite a file adaptkit
    did not write."""
    for _ in range(5):  # a concurrent saver may create or swap the target between our steps
        if not target.exists():
            try:
                os.rename(new, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue  # another save created it first: carry its user files over, then swap
        owned_now = set(owned())
        _carry_over(target, new, owned_now)
        cwd = _cwd_inside(target)
        if _exchange(new, target):
            old = new  # after the swap the temporary name holds the previous folder
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
            try:
                os.rename(target, old / "previous")
            except FileNotFoundError:  # a concurrent save moved it first
                shutil.rmtree(old, ignore_errors=True)
                continue
            os.rename(new, target)
            old = old / "previous"
        if cwd is not None:  # the process stood in the old folder; stand in the new one at the same path
            os.chdir(cwd)
        # files the user wrote into the old folder while this save ran
        _carry_over(old, target, owned_now, move=True)
        shutil.rmtree(old if old.parent == target.parent else old.parent, ignore_errors=True)
        return
    raise ConfigError(field="directory", value=str(target), problem="kept changing while saving into it",
                      fix="let one process save to this folder at a time")


def _carry_over(src: Path, dst: Path, owned: set[str], move: bool = False) -> None:
    """Recreate in ``dst`` every entry of ``src`` that is not ``owned``: hard links (a copy where the
    filesystem has none), or a rename when ``move``. Entries that ``dst`` already has are skipped
    when moving and refused otherwise (the new save would replace a file it does not own)."""
    if not src.is_dir():
        return
    for rel in files_under(src):
        if rel in owned:
            continue
        a, b = src / rel, dst / rel
        if b.exists() or b.is_symlink():
            if move or (b.exists() and os.path.samefile(a, b)):  # linked on an earlier try of this save
                continue
            raise ConfigError(field="directory", value=str(src / rel),
                              problem="is a file adaptkit did not write, and the new save writes a file of that name",
                              fix="move or rename that file, or save into another folder")
        b.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.rename(a, b)
        elif a.is_symlink():
            os.symlink(os.readlink(a), b)
        else:
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)
    for root, dirs, _ in os.walk(src):  # empty folders of the user's
        for d in dirs:
            a = Path(root) / d
            if not a.is_symlink() and not any(a.iterdir()):
                (dst / a.relative_to(src)).mkdir(parents=True, exist_ok=True)


def _cwd_inside(target: Path) -> str | None:
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        return None
    inside = Path(cwd) == target or target in Path(cwd).parents
    return cwd if inside else None


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing all of an old ``dst`` (a checkpoint
    folder holds only what its writer put there). Atomic where the OS can swap two paths."""
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
    """Swap two paths atomically (Linux >= 3.15 renameat2 RENAME_EXCHANGE), so ``b`` is never
    missing, even if the process dies here; False where the call or the filesystem cannot."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return False
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    return rename is not None and rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
