"""Checkpoints you can trust, with orbax-checkpoint.

A [`Checkpointer`][wdjax.lab.checkpoint.Checkpointer] saves a
[`TrainState`][wdjax.lab.train.TrainState] with its run's history, the metrics of the
epoch in progress, the run's configuration and one CRC-32 checksum per leaf. On
restore every checkpoint is verified — structure, shapes and dtypes against the
target, finite values, checksums — and the newest one that verifies is used, saying
so in one line when a newer one did not. An older checkpoint is deleted only after a
newer one has been written *and* verified. A directory lock keeps a second run out.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pathlib
import sys
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

FORMAT = 2  # version of what a checkpoint holds besides the state


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or trusted; the message says which and why."""


class Restored(NamedTuple):
    """What [`Checkpointer.load`][wdjax.lab.checkpoint.Checkpointer.load] found."""

    state: Any
    history: list[dict]
    pending: dict[str, list]  # per-step metrics of the epoch in progress
    config: dict | None
    step: int


def _ocp() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(
            "checkpoints need orbax-checkpoint: pip install 'wdjax[checkpoint]'"
        ) from None
    return ocp


def checksums(tree: Any) -> list[int]:
    """One CRC-32 per leaf of a pytree of host arrays, over its bytes."""
    return [zlib.crc32(np.ascontiguousarray(leaf).tobytes()) for leaf in jax.tree.leaves(tree)]


def _problem(restored: Any, like: Any, sums: list[int]) -> str | None:
    """Why `restored` cannot be trusted as a state shaped like `like`, or None."""
    if jax.tree.structure(restored) != jax.tree.structure(like):
        return "its structure differs from this run's state"
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(like), strict=True
    ):
        name = jax.tree_util.keystr(path)
        if np.shape(a) != np.shape(b) or np.dtype(a.dtype) != np.dtype(b.dtype):
            return f"{name} is {a.dtype}{list(np.shape(a))}, expected {b.dtype}{list(np.shape(b))}"
        if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
            return f"{name} holds non-finite values"
    if checksums(restored) != sums:
        return "its checksums do not match what was written"
    return None


def _stderr(message: str) -> None:
    print(f"wdjax: {message}", file=sys.stderr)


# A test hook: called as _fault_hook(point, step) at "before_write", "after_write" and
# "after_verify", so tests can kill a run at an exact point of a save (no timing).
_fault_hook: Callable[[str, int], None] | None = None


def _hook(point: str, step: int) -> None:
    if _fault_hook is not None:
        _fault_hook(point, step)


class DirectoryLock:
    """An exclusive `flock` on `directory/.wdjax.lock`, released when the process
    ends however it ends (no stale locks after a crash). Remote URLs are not locked."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self._fd: int | None = None
        if "://" in str(directory):
            return
        path = pathlib.Path(directory) / ".wdjax.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(
                f"{directory} is in use by another wdjax run (pid {owner}); "
                "wait for it to finish or choose another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


@dataclasses.dataclass
class Checkpointer:
    """Saves every `every` steps (and at the end of [`wdjax.lab.train.fit`][]) into
    `directory`, keeping the newest `keep` that verify; resumes from the newest that
    verifies. `config` (a JSON-able dict) is stored with every checkpoint and handed
    back by [`load`][wdjax.lab.checkpoint.Checkpointer.load]. `log` receives the
    one-line notes on fallbacks (default: standard error). `verify=False` skips the
    read-back after each save (restores are always verified)."""

    directory: str | os.PathLike
    every: int
    keep: int = 2
    config: dict | None = None
    log: Callable[[str], None] = _stderr
    verify: bool = True

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1 checkpoint, got {self.keep}")
        ocp = _ocp()
        where = str(self.directory)
        self._path = where if "://" in where else pathlib.Path(where).absolute()
        self._lock = DirectoryLock(self._path)
        self._manager = ocp.CheckpointManager(
            self._path, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
        )
        self._bad: set[int] = set()  # steps found unusable: replaced or deleted by save

    def steps(self) -> list[int]:
        """The steps saved in the directory, newest first (verified or not)."""
        return sorted(self._manager.all_steps(), reverse=True)

    def save(self, state: Any, history: list[dict], pending: dict | None = None) -> None:
        """Write `state` (and `history`, `pending` metrics, `config`, checksums), verify
        it, then delete the checkpoints beyond the newest `keep`."""
        ocp = _ocp()
        step = int(state.step)
        if step in self._bad:  # a damaged checkpoint of this step: write it anew
            self._manager.delete(step)
            self._bad.discard(step)
        if step in self._manager.all_steps():
            return
        host = jax.device_get(state)
        meta = {
            "format": FORMAT,
            "history": history,
            "pending": pending or {},
            "config": self.config,
            "checksums": checksums(host),
        }
        _hook("before_write", step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)
            ),
        )
        self._manager.wait_until_finished()
        _hook("after_write", step)
        if self.verify:
            problem = self._verified(step, host)[2]
            if problem is not None:
                raise CheckpointError(
                    f"checkpoint step {step} in {self._path} does not read back ({problem}); "
                    "older checkpoints were kept"
                )
        _hook("after_verify", step)
        for bad in self._bad & set(self.steps()):  # a verified one now stands after them
            self._manager.delete(bad)
        self._bad.clear()
        for old in self.steps()[self.keep :]:
            self._manager.delete(old)

    def _read(self, step: int, like: Any) -> tuple[Any, dict]:
        ocp = _ocp()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        state, meta = out["state"], out["meta"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError("its metadata is missing or of another format")
        return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(state)), meta

    def _verified(self, step: int, like: Any) -> tuple[Any, dict, str | None]:
        """`(state, meta, None)` for a checkpoint that verifies, else `(.., .., why)`."""
        try:
            state, meta = self._read(step, like)
            state = jax.device_get(state)
        except Exception as e:  # noqa: BLE001 - any failure to read means: not usable
            why = (str(e).splitlines()[0] if str(e) else "").split(" See full TensorStore")[0]
            return None, {}, f"{type(e).__name__}: {why[:200]}".rstrip(": ")
        return state, meta, _problem(state, like, meta["checksums"])

    def load(self, like: Any) -> Restored | None:
        """The newest checkpoint that verifies against `like`, or None when the
        directory holds none. Each one that fails is reported in one line; if some
        exist and none verifies, [`CheckpointError`][wdjax.lab.checkpoint.CheckpointError]."""
        failures = []
        for step in self.steps():
            state, meta, problem = self._verified(step, like)
            if problem is None:
                if failures:
                    self.log(f"resuming from step {step}, the newest checkpoint that verifies")
                state = jax.tree.map(
                    lambda a, b: jax.device_put(np.asarray(a), getattr(b, "sharding", None)),
                    state,
                    like,
                )
                return Restored(
                    state, list(meta["history"]), dict(meta["pending"]), meta["config"], step
                )
            failures.append(f"step {step}: {problem}")
            self._bad.add(step)
            self.log(f"checkpoint step {step} in {self._path} is unusable ({problem})")
        if failures:
            raise CheckpointError(f"no checkpoint in {self._path} verifies ({'; '.join(failures)})")
        return None

    def restore(self, like: Any, history: list[dict]) -> tuple[Any, list[dict]]:
        """The newest verified state and its history, or `(like, history)` if none."""
        found = self.load(like)
        return (like, history) if found is None else (found.state, found.history)

    def close(self) -> None:
        """Finish pending writes and release the directory lock."""
        self._manager.close()
        self._lock.release()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
