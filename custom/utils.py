"""Small helpers the bundle configs call: label names, atomic file writes, rank checks, argument guards."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_write",
    "atomic_torch_save",
    "remove_stale_temporaries",
    "DiskFullError",
    "is_main_process",
    "class_names_from_metadata",
    "seed_everything",
    "one_line_reason",
    "NotABoolError",
    "require_bool",
    "bare_module",
]


def is_main_process() -> bool:
    """True outside DDP and on rank 0 inside it: the one process that writes shared files."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


class NotABoolError(TypeError, ValueError):
    """A True/False setting got something else; a ``TypeError`` and a ``ValueError``, so callers catching either see it."""


def require_bool(value: object, name: str, none: str | None = None) -> bool | None:
    """``value`` when it is True or False (or None, where ``none`` says what None means); else a clear error.

    The bundle command line reads values as Python literals: ``--amp false`` or ``--resume null`` arrive
    as the non-empty strings ``"false"`` and ``"null"``, which a plain ``if value:`` would take as true.
    Every True/False setting of the bundles goes through this one check.

    Args:
        value: the setting as the config gave it.
        name: its id (the message says how to write it: ``--<name> False``).
        none: what None means (e.g. ``"from the weights"``); None: None is refused too.

    Raises:
        NotABoolError: ``value`` is not a bool (nor None where ``none`` allows it).

    >>> require_bool(False, "amp")
    False
    >>> require_bool("false", "amp")
    Traceback (most recent call last):
    ...
    custom.utils.NotABoolError: amp must be True or False, got 'false' (str): command-line values are Python \
literals; write `--amp True` or `--amp False`.
    """
    if isinstance(value, bool) or (value is None and none is not None):
        return value
    if none is None:
        allowed, spelled = "True or False", f"`--{name} True` or `--{name} False`"
    else:
        allowed, spelled = f"None ({none}), True or False", f"`--{name} None`, `--{name} True` or `--{name} False`"
    raise NotABoolError(
        f"{name} must be {allowed}, got {value!r} ({type(value).__name__}): command-line values are Python "
        f"literals; write {spelled}."
    )


def bare_module(obj: Any) -> Any:
    """The model inside a DDP/DataParallel wrapper (its ``module``), anything else as it is.

    ``monai.networks.utils.get_state_dict`` unwraps the same way but returns the state dict; this is for
    the callers that need the module itself (to load into it, or to compare its keys). A wrapper's
    state dict keys carry a ``module.`` prefix, the bare model's do not.

    >>> net = torch.nn.Linear(2, 2)
    >>> bare_module(torch.nn.DataParallel(net)) is net, bare_module(net) is net, bare_module("x")
    (True, True, 'x')
    """
    inner = getattr(obj, "module", None) if isinstance(obj, torch.nn.Module) else None
    return inner if isinstance(inner, torch.nn.Module) else obj


class DiskFullError(OSError):
    """A save ran out of disk space (ENOSPC or a quota); the message names the folder and the file kept."""


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` or one of its causes is "no space left" (torch.save reports it as a RuntimeError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _temp_prefix(path: Path) -> str:
    """``.<name>.<host>.<pid>.``: a temporary file names the process writing it, so a later run can tell a
    stale one (its writer is gone) from one being written right now."""
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def atomic_write(
    path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb", previous: str | os.PathLike | None = None
) -> None:
    """Write ``path`` through ``write(fileobj)`` into a temporary file beside it, fsync, then rename.

    A process killed mid-write leaves the previous ``path`` intact (rename is atomic on POSIX);
    the temporary file is removed on any error. With ``previous``, the old ``path`` is renamed to
    ``previous`` once the new file is complete (two generations: a newest file found damaged later
    still has a good one beside it); a kill between the two renames leaves ``previous`` alone, which
    readers of the pair accept.

    Raises:
        DiskFullError: the disk holding ``path`` is full. ``torch.save`` buries the ``ENOSPC`` under
            "[enforce fail at inline_container.cc] unexpected pos"; this says it in one line, with
            the folder, and that the previous ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        # text is UTF-8 whatever the locale (an ASCII locale cannot write the summaries' ±)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not _disk_full(e):
            raise
        free = shutil.disk_usage(path.parent).free
        kept = f"the previous {path} is intact" if path.exists() else f"{path} was not written"
        raise DiskFullError(
            errno.ENOSPC,
            f"the disk at {path.parent} is full ({free / 2**20:.1f} MiB free): could not save {path.name}; {kept}. "
            "Free space there (or point the run at another folder), then run the same command again",
        ) from e


def atomic_torch_save(obj: Any, path: str | os.PathLike, previous: str | os.PathLike | None = None) -> None:
    """``torch.save`` made atomic with :func:`atomic_write` (``previous``: keep the old file under that name)."""
    atomic_write(path, lambda f: torch.save(obj, f), previous=previous)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike, older_than_s: float = 3600.0) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left beside ``path`` when its process was killed mid-save.

    A temporary file names its host and process (``.<name>.<host>.<pid>.XXXX.tmp``): one from this host
    whose process is gone is removed; one from another host (a shared file system) or in the older
    unnamed form (``.<name>.XXXX.tmp``) only when untouched for ``older_than_s`` seconds, so that a save
    in progress elsewhere is never cut short.

    Returns:
        the files removed.
    """
    path = Path(path)
    host = socket.gethostname()
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        middle = tmp.name[len(path.name) + 2 : -len(".tmp")].split(".")
        try:
            mine = len(middle) >= 3 and ".".join(middle[:-2]) == host and not _alive(int(middle[-2]))
            old = time.time() - tmp.stat().st_mtime > older_than_s
        except (ValueError, OSError):
            continue
        if mine or old:
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def class_names_from_metadata(meta_file: str | os.PathLike, output: str = "pred") -> list[str]:
    """Class names by channel index from ``network_data_format.outputs.<output>.channel_def``.

    metadata.json is the one place a bundle names its classes (MONAI Label reads it too), so the
    evaluation report takes the names from there instead of repeating them in a config.

    Raises:
        ValueError: the channel_def is missing or its keys are not 0..N-1.
    """
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    try:
        channel_def = meta["network_data_format"]["outputs"][output]["channel_def"]
    except KeyError as e:
        raise ValueError(f"{meta_file}: no network_data_format.outputs.{output}.channel_def") from e
    if sorted(int(k) for k in channel_def) != list(range(len(channel_def))):
        raise ValueError(f"{meta_file}: channel_def keys must be 0..{len(channel_def) - 1}, got {list(channel_def)}")
    return [channel_def[str(i)] for i in range(len(channel_def))]


# -- per-rank seeding -----------------------------------------------------------------------------
def seed_everything(seed: int | None, rank: int | None = None) -> int | None:
    """Seed torch, numpy and Python's ``random`` with ``seed + rank``, through MONAI's ``set_determinism``.

    Under DDP every process runs the same config; one seed on every rank makes every rank draw the same
    random numbers: the same crops (of whatever volume its sampler gives it), flips, rotations and
    masks, so a global batch of W ranks holds only one rank's worth of independent augmentation (and,
    in pre-training, duplicate "negatives"). Offsetting the seed by the rank gives each process its
    own stream, reproducible for a given ``seed`` and world size; rank 0 (and a single process) draws
    exactly what ``set_determinism(seed)`` draws. What else follows the global generators: MONAI's
    ``DataLoader`` seeds its transforms' own random states (``Randomizable.R``) and its workers from
    torch's global generator (``monai.data.utils.set_rnd``, ``worker_init_fn``), and
    ``custom.networks.ssl.SSLViews(seed=None)`` seeds its generator from it, so they differ per rank too.
    ``DistributedSampler`` keeps its own ``seed`` (same on every rank, as the split needs).

    Args:
        seed: base seed; None disables determinism (``set_determinism(None)``: each process draws from
            fresh entropy).
        rank: this process's rank; None reads it from ``torch.distributed`` (0 when not initialised).

    Returns:
        the seed used in this process (None when ``seed`` is None).

    Raises:
        ValueError: ``seed`` or ``rank`` is not a non-negative integer (e.g. the string ``"0"``).

    >>> seed_everything(7, rank=1)
    8
    """
    import logging

    from monai.utils import set_determinism

    if rank is None:
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    for name, value in (("seed", seed), ("rank", rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    used = None if seed is None else seed + rank
    set_determinism(seed=used)
    logging.getLogger(__name__).info(f"rank {rank}: random seed {used} (base seed {seed} + rank)")
    return used


def one_line_reason(error: BaseException, limit: int = 400, innermost: bool = True) -> str:
    """``"<type>: <message>"`` of ``error`` in one line of at most ``limit`` characters: the one error formatter.

    With ``innermost`` (the default), the innermost cause is named: MONAI wraps a reader's error in "applying
    transform", and the reader's own message is what the user can act on. ``innermost=False`` names ``error``
    itself, for messages that already say what failed (a checkpoint read, a corpus build on another rank).

    Args:
        error: the exception to describe.
        limit: the longest line returned (longer ones end in ``...``).
        innermost: follow ``__cause__`` (and ``__context__``, unless suppressed) to the first error raised.

    >>> try:
    ...     try:
    ...         raise EOFError("Compressed file ended")
    ...     except EOFError as e:
    ...         raise RuntimeError("applying transform <LoadImaged object at 0x1>") from e
    ... except RuntimeError as e:
    ...     print(one_line_reason(e))
    ...     print(one_line_reason(e, innermost=False))
    EOFError: Compressed file ended
    RuntimeError: applying transform <LoadImaged object at 0x1>
    >>> one_line_reason(EOFError())
    'EOFError: no message'
    """
    seen = set()
    while (
        innermost
        and id(error) not in seen
        and (error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__))
    ):
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    text = f"{type(error).__name__}: {' '.join(str(error).split()) or 'no message'}"
    # ITK's messages: drop the source location, and the stale errno text it appends to a file it found but
    # could not read ("Reason: No such file or directory" for a truncated .mha)
    text = re.sub(r"\S*itk\S*\.(cxx|h|hxx):\d+: ITK ERROR: \w+\(0x[0-9a-f]+\): ", "ITK: ", text)
    text = text.replace(" for reading. Reason: No such file or directory", " (corrupt or truncated)")
    return text if len(text) <= limit else text[: limit - 3] + "..."
