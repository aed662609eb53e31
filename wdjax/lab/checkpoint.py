"""Checkpoints of a [`wdjax.lab.train.TrainState`][] and its history, with orbax-checkpoint."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax


def _ocp() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(
            "checkpoints need orbax-checkpoint: pip install 'wdjax[checkpoint]'"
        ) from None
    return ocp


@dataclasses.dataclass
class Checkpointer:
    """Saves every `every` steps (and at the end of [`wdjax.lab.train.fit`][]) into
    `directory`, keeping the newest `keep`;
    [`restore`][wdjax.lab.checkpoint.Checkpointer.restore] resumes the latest."""

    directory: str | pathlib.Path
    every: int
    keep: int = 2

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {self.every}")
        ocp = _ocp()
        self._manager = ocp.CheckpointManager(
            pathlib.Path(self.directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True),
        )

    def save(self, state: Any, history: list[dict]) -> None:
        ocp = _ocp()
        step = int(state.step)
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)
            ),
        )
        self._manager.wait_until_finished()

    def restore(self, like: Any, history: list[dict]) -> tuple[Any, list[dict]]:
        """The latest saved state (shaped like `like`) and history, or the inputs if none."""
        step = self._manager.latest_step()
        if step is None:
            return like, history
        ocp = _ocp()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()
            ),
        )
        return type(like)(*out["state"]), list(out["history"])

    def close(self) -> None:
        self._manager.close()
