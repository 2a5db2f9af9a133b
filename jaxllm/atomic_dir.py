"""Directories written atomically: build a sibling, then swap it into place.

`new_sibling(target)` makes an empty temporary directory beside `target`
(``.NAME.tmp-PID-RANDOM``); once everything is written into it, `commit(tmp,
target)` flushes it to disk and puts it at `target` in one step (Linux
``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, the old copy set aside as
``.NAME.old-...`` in between, which `readable(target)` finds if a kill lands
there). A writer killed at any moment leaves the previous `target` readable;
its leftovers are never read, and the next `new_sibling` of the same target
deletes them. Two processes writing the same target at once are not supported.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import time


def new_sibling(target: str) -> str:
  """An empty temporary directory beside `target` (whose parent is created),
  after cleaning up what earlier, killed writers of `target` left."""
  parent, base = os.path.split(os.path.abspath(target))
  os.makedirs(parent, exist_ok=True)
  _clean_siblings(parent, base)
  tmp = os.path.join(parent, f".{base}{_TMP}{os.getpid()}-{secrets.token_hex(4)}")
  os.mkdir(tmp)
  return tmp


def commit(tmp: str, target: str) -> None:
  """Flushes the complete directory `tmp` to disk and puts it at `target`,
  deleting what was there."""
  _fsync_tree(tmp)
  _replace(tmp, os.path.abspath(target))


def readable(target: str) -> str | None:
  """Where to read `target` from: itself if it is a directory, else the old copy
  an interrupted two-rename commit left aside, else None."""
  path = os.path.abspath(target)
  if os.path.isdir(path):
    return path
  if os.path.lexists(path):
    return None
  parent, base = os.path.split(path)
  asides = sorted(_siblings(parent, base, _OLD), key=lambda s: s[1])
  return asides[-1][0] if asides else None


def _fsync_tree(root: str) -> None:
  """Flushes every file and directory under `root` to disk (a power cut after the
  swap must not leave the new checkpoint's data behind in the page cache)."""
  for dirpath, _, names in os.walk(root):
    for name in names:
      fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError:  # some file systems refuse fsync on a directory; nothing to flush then
    pass
  finally:
    os.close(fd)


# Sibling names: `.NAME.tmp-PID-RANDOM` (a save in progress, or the old copy it
# swapped out) and `.NAME.old-NANOSECONDS-PID` (the old copy moved aside when the
# two-rename fallback is used).
_TMP = ".tmp-"
_OLD = ".old-"


def _siblings(parent: str, base: str, kind: str) -> list[tuple[str, int, int]]:
  """(path, first number, second number) of `parent`'s siblings of `base` of `kind`."""
  pattern = re.compile(re.escape(f".{base}{kind}") + r"(\d+)-([0-9a-f]+)")
  found = []
  try:
    names = os.listdir(parent)
  except OSError:
    return found
  for name in names:
    match = pattern.fullmatch(name)
    if match:
      found.append((os.path.join(parent, name), int(match[1]), int(match[2], 16)))
  return found


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # exists, owned by someone else
    return True
  return True


def _clean_siblings(parent: str, base: str) -> None:
  """Before a save: puts back an old copy a killed two-rename swap left aside (if
  the target is gone), and deletes the temporaries of earlier, killed saves."""
  target = os.path.join(parent, base)
  asides = sorted(_siblings(parent, base, _OLD), key=lambda s: s[1])
  if asides and not os.path.lexists(target):
    os.rename(asides.pop()[0], target)
  for path, _, _ in asides:
    shutil.rmtree(path, ignore_errors=True)
  for path, pid, _ in _siblings(parent, base, _TMP):
    if not _alive(pid):  # a save still running in another process keeps its own
      shutil.rmtree(path, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps the paths `a` and `b` (Linux renameat2 RENAME_EXCHANGE);
  False where the OS or file system does not support it."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):  # glibc < 2.28, or not glibc
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  renameat2.restype = ctypes.c_int
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), b)


def _replace(tmp: str, target: str) -> None:
  """Puts the complete checkpoint `tmp` at `target`, then deletes what was there."""
  parent, base = os.path.split(target)
  if not os.path.lexists(target):
    os.rename(tmp, target)
  elif _exchange(tmp, target):
    shutil.rmtree(tmp)  # now the old checkpoint
  else:  # two renames; `_locate` reads the aside copy if a kill lands between them
    aside = os.path.join(parent, f".{base}{_OLD}{time.time_ns()}-{os.getpid():x}")
    os.rename(target, aside)
    os.rename(tmp, target)
    shutil.rmtree(aside)
  _fsync_dir(parent)
