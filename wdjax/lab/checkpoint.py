"""Checkpoints you can trust, with orbax-checkpoint.

A [`Checkpointer`][wdjax.lab.checkpoint.Checkpointer] saves a
[`TrainState`][wdjax.lab.train.TrainState] with its run's history, the metrics of the
epoch in progress, the run's configuration and one checksum per leaf. Saves are
asynchronous: training goes on while orbax writes, and the wait (then the read-back
check) happens before the next save, at [`wait`][wdjax.lab.checkpoint.Checkpointer.wait]
and at close. On restore every checkpoint is verified — structure, shapes and dtypes
against the target, finite values, checksums — and the newest one that verifies is
used, saying so in one line when a newer one did not. An older checkpoint is deleted
only after a newer one has been written *and* verified. A directory lock keeps a second
run out.

Sharded states are saved as they are (each process writes its shards) and restored
onto the shardings of the target: a run saved on 8 devices resumes on 4 or on 1. The
checksums are computed on the devices, so they do not depend on the layout: per leaf,
`Σᵢ wordᵢ·(2·hash(i) + 1) mod 2³²` over the leaf's 32-bit words, which detects any
change of a single word.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import fcntl
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = 3  # version of what a checkpoint holds besides the state (3: device checksums)


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


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as a flat array of uint32 words (narrower items widened)."""
    if jnp.iscomplexobj(x):
        x = jnp.stack([jnp.real(x), jnp.imag(x)])
    x = jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
    if size < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()
    return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()  # 8 bytes: (..., 2) words


@jax.jit
def _inspect(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per leaf, a layout-independent checksum and whether its values are finite."""
    sums, finite = [], []
    for x in leaves:
        words = _words(jnp.asarray(x))
        i = jnp.arange(words.size, dtype=jnp.uint32)
        weights = (i * jnp.uint32(2654435761)) | jnp.uint32(1)  # odd: any word change shows
        sums.append(jnp.sum(words * weights, dtype=jnp.uint32))
        inexact = jnp.issubdtype(x.dtype, jnp.inexact)
        finite.append(jnp.all(jnp.isfinite(x)) if inexact else jnp.array(True))
    empty = (jnp.zeros([0], jnp.uint32), jnp.zeros([0], bool))
    return (jnp.stack(sums), jnp.stack(finite)) if leaves else empty


def checksums(tree: Any) -> list[int]:
    """One checksum per leaf of a pytree of arrays (sharded or not, on any devices),
    computed where the arrays are."""
    return np.asarray(_inspect(jax.tree.leaves(tree))[0]).tolist()


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
    found, finite = (np.asarray(v) for v in _inspect(jax.tree.leaves(restored)))
    for (path, _), ok in zip(jax.tree_util.tree_leaves_with_path(restored), finite, strict=True):
        if not ok:
            return f"{jax.tree_util.keystr(path)} holds non-finite values"
    if found.tolist() != list(sums):
        return "its checksums do not match what was written"
    return None


_BACKGROUND = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wdjax-checkpoint")


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
    `directory` (a local path or a URL such as `gs://bucket/run`, kept as given),
    keeping the newest `keep` that verify; resumes from the newest that verifies.
    `config` (a JSON-able dict) is stored with every checkpoint and handed back by
    [`load`][wdjax.lab.checkpoint.Checkpointer.load]. `log` receives the one-line notes
    on fallbacks (default: standard error). `verify=False` skips the read-back after
    each save (restores are always verified). `asynchronous=False` waits for each
    write (and its read-back) inside `save`.

    Under several processes every process makes the same calls; orbax coordinates the
    writes, and process 0 holds the directory lock."""

    directory: str | os.PathLike
    every: int
    keep: int = 2
    config: dict | None = None
    log: Callable[[str], None] = _stderr
    verify: bool = True
    asynchronous: bool = True

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1 checkpoint, got {self.keep}")
        ocp = _ocp()
        where = os.fspath(self.directory)
        self._path = where if "://" in where else pathlib.Path(where).absolute()
        self._lock = DirectoryLock(self._path) if jax.process_index() == 0 else None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=self.asynchronous
        )
        self._manager = ocp.CheckpointManager(self._path, options=options)
        self._bad: set[int] = set()  # steps found unusable: replaced or deleted by save
        self._writing: tuple[int, Any, list[int]] | None = None  # step, target, checksums
        self._finishing: concurrent.futures.Future | None = None  # _finish, in the background

    @property
    def path(self) -> str | pathlib.Path:
        """Where the checkpoints are: an absolute local path, or the URL as given."""
        return self._path

    def steps(self) -> list[int]:
        """The steps saved in the directory, newest first (verified or not)."""
        return sorted(self._manager.all_steps(), reverse=True)

    def save(self, state: Any, history: list[dict], pending: dict | None = None) -> None:
        """Start writing `state` (and `history`, `pending` metrics, `config`,
        checksums) after finishing the previous write; training goes on while it is
        written. [`wait`][wdjax.lab.checkpoint.Checkpointer.wait] finishes it."""
        ocp = _ocp()
        step = int(state.step)
        self.wait()
        if step in self._bad:  # a damaged checkpoint of this step: write it anew
            self._manager.delete(step)
            self._bad.discard(step)
        if step in self._manager.all_steps():
            return
        sums = checksums(state)
        meta = copy.deepcopy(  # written in the background, while the run appends to history
            {
                "format": FORMAT,
                "history": history,
                "pending": pending or {},
                "config": self.config,
                "checksums": sums,
            }
        )
        _hook("before_write", step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )  # returns once the arrays are copied off the devices: `state` may be donated
        self._writing = (step, jax.tree.map(ocp.utils.to_shape_dtype_struct, state), sums)
        if not self.asynchronous:
            self.wait()
        elif jax.process_count() == 1:  # several processes verify in step, at `wait`
            self._finishing = _BACKGROUND.submit(self._finish)

    def wait(self) -> None:
        """Finish the write in progress, verify it by reading it back, then delete the
        checkpoints beyond the newest `keep`; `CheckpointError` if it does not verify.
        (In one process, an asynchronous save does this in a background thread: `wait`
        waits for that thread and raises what it raised.)"""
        if self._finishing is not None:
            finishing, self._finishing = self._finishing, None
            finishing.result()
        if self._writing is not None:
            self._finish()

    def _finish(self) -> None:
        (step, like, sums), self._writing = self._writing, None
        self._manager.wait_until_finished()
        _hook("after_write", step)
        if self.verify:
            problem = self._verified(step, like, sums)[2]
            if problem is not None:
                self._bad.add(step)
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

    def _verified(
        self, step: int, like: Any, sums: list[int] | None = None
    ) -> tuple[Any, dict, str | None]:
        """`(state, meta, None)` for a checkpoint that verifies, else `(.., .., why)`;
        the state is restored onto `like`'s shardings."""
        try:
            state, meta = self._read(step, like)
        except Exception as e:  # noqa: BLE001 - any failure to read means: not usable
            why = (str(e).splitlines()[0] if str(e) else "").split(" See full TensorStore")[0]
            return None, {}, f"{type(e).__name__}: {why[:200]}".rstrip(": ")
        if sums is not None and list(meta["checksums"]) != list(sums):
            return state, meta, "its stored checksums are not those of the state saved"
        return state, meta, _problem(state, like, meta["checksums"])

    def load(self, like: Any) -> Restored | None:
        """The newest checkpoint that verifies, restored onto the shardings of `like`
        (this run's layout, whatever the saving run's was), or None when the directory
        holds none. Each one that fails is reported in one line; if some exist and none
        verifies, [`CheckpointError`][wdjax.lab.checkpoint.CheckpointError]."""
        self.wait()
        failures = []
        for step in self.steps():
            state, meta, problem = self._verified(step, like)
            if problem is None:
                if failures:
                    self.log(f"resuming from step {step}, the newest checkpoint that verifies")
                return Restored(
                    state, list(meta["history"]), dict(meta["pending"]), meta["config"], step
                )
            failures.append(f"step {step}: {problem}")
            self._bad.add(step)
            self.log(f"checkpoint step {step} in {self._path} is unusable ({problem})")
        if failures:
            raise CheckpointError(f"no checkpoint in {self._path} verifies ({'; '.join(failures)})")
        return None

    def stored_config(self) -> dict | None:
        """The run configuration stored with the newest readable checkpoint (None if
        there is none): what a resume on another machine compares its options with."""
        ocp = _ocp()
        for step in self.steps():
            try:
                args = ocp.args.Composite(meta=ocp.args.JsonRestore())
                meta = self._manager.restore(step, args=args)["meta"]
            except Exception:  # noqa: BLE001, S112 - unreadable: try the next older one
                continue
            if isinstance(meta, dict) and meta.get("format") == FORMAT:
                return meta.get("config")
        return None

    def restore(self, like: Any, history: list[dict]) -> tuple[Any, list[dict]]:
        """The newest verified state and its history, or `(like, history)` if none."""
        found = self.load(like)
        return (like, history) if found is None else (found.state, found.history)

    def close(self) -> None:
        """Finish (and verify) the write in progress and release the directory lock;
        the lock is released even when that write fails."""
        try:
            self.wait()
        finally:
            self._manager.close()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
