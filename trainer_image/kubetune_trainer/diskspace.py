"""Free space on node-local scratch, checked before the big writes (model and checkpoint downloads,
checkpoint saves), so a full disk is one line naming the directory, the bytes needed and free and
the spec field that sizes the scratch volume, instead of a SafetensorError traceback half-way.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from kubetune.conventions import ENV_CACHE_DIR
from kubetune_trainer.errors import JobError

SCRATCH_FIELD = "spec.resources.scratch_size"


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes free for this process in the file system holding `directory` (or its nearest ancestor)."""
    p = Path(directory).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def no_space_message(what: str, directory: str | os.PathLike, needed: int | None, free: int) -> str:
    need = f"needs {_mb(needed)}, " if needed is not None else ""
    return (
        f"{what}: not enough disk space in {directory} ({need}{_mb(free)} free); give the pods more "
        f"scratch space with {SCRATCH_FIELD} (running locally: free some space or point ${ENV_CACHE_DIR} "
        "at a larger disk)"
    )


def ensure_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """JobError unless `needed` bytes fit in `directory`'s file system now."""
    free = free_bytes(directory)
    if needed > free:
        raise JobError(no_space_message(what, directory, needed, free))


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a full disk: ENOSPC/EDQUOT, or the text safetensors and
    torch.save give it (they wrap the OSError in their own exceptions)."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


__all__ = ["SCRATCH_FIELD", "ensure_free_space", "free_bytes", "is_disk_full", "no_space_message"]
