"""Faults, and what wdjax does about them: nothing lost, nothing silent.

Each class is one kind of failure, driven by a table of ways to cause it:

* damaged checkpoints: verified restore, one-line notes, fallback, rotation;
* resuming with other options than the stored run's (CLI);
* schedules that give a NaN, infinite or negative η or λ, and updates that overflow;
* decoupled decay whose per-step factor c·λ reaches 1 (it would flip the weights);
* outputs that cannot be written, a directory another run holds, a full disk;
* a validation loss that is never finite (early stopping);
* a run killed (SIGKILL) at each point of a checkpoint write, then resumed;
* masks and rate maps that together select nothing;
* bad command lines: one line ``wdjax: error: ...``, exit status 2, no traceback;
* API arguments outside their domain.

Behaviour that does not hold yet is asserted as it should be and marked
``xfail(strict=True)`` with the reason, so that the fix turns it into a failure to
remove the mark; the two failures that do not happen every time (they depend on orbax's
threads) are ``pytest.xfail`` calls made after everything that does hold was asserted.
Subprocesses are used only where a process must die or its standard error must be read;
they share a persistent compilation cache (shared by pytest-xdist's workers).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import float_leaves

import wdjax
from wdjax.lab import checkpoint, cli, data, tasks, train

# Restoring a damaged checkpoint leaves orbax/tensorstore callbacks that later run on a
# closed asyncio event loop ("RuntimeError: Event loop is closed", an unraisable exception
# in a background thread): noise from orbax, not a failure of the restore under test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# ------------------------------------------------------------------ a small regression task
# 32x32 kernels: large enough that orbax stores them in data files of their own (smaller
# arrays are inlined into the OCDBT b-tree), so "the largest data file" is real data.

_rng = np.random.default_rng(0)
_X = _rng.normal(size=(64, 32)).astype(np.float32)
_Y = (_X @ np.linspace(-1, 1, 32)[:, None]).astype(np.float32)
DATA = ({"x": _X[:48], "y": _Y[:48]}, {"x": _X[48:], "y": _Y[48:]})
BATCH = 8
STEPS_PER_EPOCH = 48 // BATCH  # 6
EVERY = 3  # checkpoint interval: two checkpoints per epoch


def _init(key: jax.Array) -> dict:
    return {
        "dense": {"kernel": 0.2 * jax.random.normal(key, (32, 32)), "bias": jnp.zeros(32)},
        "head": {"kernel": jnp.full((32, 1), 0.1), "bias": jnp.zeros(1)},
    }


def _mse(params: dict, batch: dict) -> jax.Array:
    h = jnp.tanh(batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.mean((h @ params["head"]["kernel"] + params["head"]["bias"] - batch["y"]) ** 2)


TASK = tasks.task(_init, _mse, name="regression")
OPT = wdjax.adamw(1e-2, 1e-3)


def _finite(tree: Any) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def _adam_counts(opt_state: Any) -> list[int]:
    kind = optax.ScaleByAdamState
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kind))
    return [int(x.count) for x in found if isinstance(x, kind)]


def _same(a: Any, b: Any) -> bool:
    """Equal bit for bit, leaf by leaf."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb, strict=True)
    )


def _like() -> train.TrainState:
    """A state shaped like the one `fit(TASK, OPT, ...)` trains."""
    return train.init_state(TASK, OPT, jax.random.PRNGKey(0))


# ------------------------------------------------------------------ running the CLI


def _args(epochs: int) -> list[str]:
    """A small CLI run: the 4 XOR points one at a time (4 steps an epoch), no sklearn; a
    32x32 kernel, so that checkpoints have a data file (OCDBT inlines arrays under 1 KiB)."""
    argv = f"train --dataset xor --widths 32,32 --epochs {epochs} --batch-size 1 --no-progress"
    return argv.split()


CLI_ARGS = _args(6)  # 24 steps
# Every 6 steps puts checkpoints mid-epoch (6, 18) and at epoch ends (12, 24), with only two
# scan lengths (4 and 2) to compile.
CKPT_ARGS = ["--checkpoint-every", "6"]

# Runs the CLI with a fault injected at one point of one checkpoint write:
#   argv: ACTION POINT STEP CLI-ARGS...   ACTION: kill | fill=<path> (fill the disk)
#   POINT: before_write | after_write | after_verify (wdjax's hook), or mid_write (inside
#   orbax: the files are written to the temporary directory, not yet renamed into place).
LAUNCHER = """
import os, signal, sys
import wdjax.lab.checkpoint as c
action, point, step, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
def fault():
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    with open(action.removeprefix("fill="), "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError:
            pass
if point == "mid_write":
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def faulty_finalize(self):
        if str(step) in (self.get_final().name, self.get_final().parent.name):
            fault()
        return await finalize(self)
    atomicity.AtomicRenameTemporaryPath.finalize = faulty_finalize
else:
    c._fault_hook = lambda p, s: fault() if (p, s) == (point, step) else None
from wdjax.lab.cli import main
sys.exit(main(argv))
"""


def _shared(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The session's temporary root, shared by the test workers of pytest-xdist (JAX
    writes cache entries atomically, so workers can share one cache)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for CLI subprocesses: CPU, and a persistent compilation cache, so
    that only the first subprocess compiles."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(_shared(tmp_path_factory) / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _run(
    argv: list[str], env: dict[str, str] | None = None, fault: tuple[str, str, int] | None = None
) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (through the fault launcher when `fault` is given)."""
    env = env or {**os.environ, "JAX_PLATFORMS": "cpu"}
    if fault is None:
        cmd = [sys.executable, "-m", "wdjax.lab.cli", *argv]
    else:
        action, point, step = fault
        cmd = [sys.executable, "-c", LAUNCHER, action, point, str(step), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _records(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(err: str, *fragments: str) -> None:
    """`err` is exactly one line `wdjax: error: ...` holding `fragments`, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("wdjax: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


@dataclasses.dataclass
class Baseline:
    out: pathlib.Path
    records: list[dict]
    summary: dict


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, jax_cache: dict) -> Baseline:
    """The uninterrupted CLI run (6 epochs of 4 steps, checkpoints every 6 steps)."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    proc = _run([*CLI_ARGS, *CKPT_ARGS, "--out", str(out)], jax_cache)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    return Baseline(out, _records(out), summary)


# ========================================================================== 1 and 9
# Damaged checkpoints


def _step_files(step_dir: pathlib.Path, kind: str) -> list[pathlib.Path]:
    """The files of one kind in an orbax step directory (found by walking it)."""
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    data_files = [p for p in files if p.parent.name == "d"]  # OCDBT's data and b-tree files
    find: dict[str, Callable[[], list[pathlib.Path]]] = {
        # the largest file can be state/_METADATA when the arrays are spread over several
        # data files (the layout depends on the writer threads' timing)
        "largest data file": lambda: [max(data_files, key=lambda p: p.stat().st_size)],
        "meta json": lambda: [step_dir / "meta" / "metadata"],
        "tree metadata": lambda: [step_dir / "state" / "_METADATA"],
        "ocdbt manifest": lambda: [step_dir / "state" / "manifest.ocdbt"],
        "ocdbt b-tree": lambda: sorted((step_dir / "state" / "d").glob("*")),
        "step metadata": lambda: [step_dir / "_CHECKPOINT_METADATA"],
        "commit markers": lambda: [p for p in files if p.name == "commit_success.txt"],
        "process manifest": lambda: sorted(step_dir.glob("state/ocdbt.process_*/manifest.ocdbt")),
    }
    chosen = find[kind]() if data_files or kind != "largest data file" else []
    assert chosen and all(p.is_file() for p in chosen), (
        f"orbax's layout changed: no {kind} in {sorted(map(str, files))}"
    )
    return chosen


def _damage(path: pathlib.Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(bytes(raw[:middle]))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b'{"not": json')
    elif how == "bit":  # one bit: the subtlest corruption
        raw[middle] ^= 0x01
        path.write_bytes(bytes(raw))
    elif how == "bytes":
        for i in range(middle, min(len(raw), middle + 8)):
            raw[i] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:
        raise ValueError(how)


def _damage_step(directory: pathlib.Path, step: int, kind: str, how: str) -> list[pathlib.Path]:
    files = _step_files(directory / str(step), kind)
    for path in files:
        _damage(path, how)
    return files


# Damage to what a checkpoint's state or metadata is read from: the newest checkpoint
# must be skipped, with a note, for the previous one.
DATA_DAMAGE = [
    ("largest data file", "bit"),
    ("largest data file", "bytes"),
    ("largest data file", "truncate"),
    ("largest data file", "empty"),
    ("largest data file", "delete"),
    ("meta json", "bytes"),
    ("meta json", "truncate"),
    ("meta json", "garbage"),
    ("meta json", "empty"),
    ("meta json", "delete"),
    ("tree metadata", "truncate"),
    ("tree metadata", "garbage"),
    ("tree metadata", "empty"),
    ("tree metadata", "delete"),
    ("ocdbt manifest", "bit"),
    ("ocdbt manifest", "truncate"),
    ("ocdbt manifest", "empty"),
    ("ocdbt manifest", "delete"),
    ("ocdbt b-tree", "bit"),
    ("ocdbt b-tree", "truncate"),
    ("ocdbt b-tree", "delete"),
]
# Damage to files a restore may not need: either the newest checkpoint still restores
# exactly what was saved, or it is skipped with a note. Never a wrong state.
OTHER_DAMAGE = [
    ("step metadata", "garbage"),
    ("step metadata", "delete"),
    ("commit markers", "garbage"),
    ("commit markers", "delete"),
    ("process manifest", "truncate"),
    ("process manifest", "delete"),
    ("tree metadata", "bit"),
]


@dataclasses.dataclass
class Saved:
    directory: pathlib.Path  # checkpoints at steps 12 and 9 (keep=2)
    result: train.FitResult  # the uninterrupted 2-epoch run
    restored: dict[int, checkpoint.Restored]  # what each checkpoint restores, undamaged


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    root = tmp_path_factory.mktemp("saved")
    with checkpoint.Checkpointer(root / "ckpt", EVERY, keep=2) as ckpt:
        result = train.fit(
            TASK, OPT, DATA, epochs=2, batch_size=BATCH, checkpoints=ckpt, progress=False
        )
        assert ckpt.steps() == [12, 9]
    restored = {}
    for step in (12, 9):
        copy = root / f"only{step}"
        shutil.copytree(root / "ckpt", copy)
        for other in {12, 9} - {step}:
            shutil.rmtree(copy / str(other))
        with checkpoint.Checkpointer(copy, EVERY) as ckpt:
            restored[step] = ckpt.load(_like())
    return Saved(root / "ckpt", result, restored)


def _copy(saved: Saved, tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / "ckpt"
    shutil.copytree(saved.directory, target)
    return target


def _load(directory: pathlib.Path) -> tuple[checkpoint.Restored | None, list[str]]:
    notes: list[str] = []
    with checkpoint.Checkpointer(directory, EVERY, log=notes.append) as ckpt:
        return ckpt.load(_like()), notes


def _assert_fell_back(notes: list[str], bad: int = 12, good: int = 9) -> None:
    """One line per unusable checkpoint, then one saying which one is used."""
    assert len(notes) == 2, notes
    assert all("\n" not in note for note in notes), notes
    assert notes[0].startswith(f"checkpoint step {bad} in ") and "is unusable (" in notes[0]
    assert notes[1] == f"resuming from step {good}, the newest checkpoint that verifies"


def _assert_restores(found: checkpoint.Restored, expected: checkpoint.Restored) -> None:
    assert found.step == expected.step
    assert _same(found.state, expected.state)
    assert found.history == expected.history and found.pending == expected.pending


class TestDamagedCheckpoint:
    """A damaged newest checkpoint is skipped with a one-line note, the previous one that
    verifies is used, and the run resumed from it equals the uninterrupted run."""

    @pytest.mark.parametrize("kind, how", DATA_DAMAGE)
    def test_newest_is_skipped_for_the_previous_one(self, saved, tmp_path, kind, how):
        directory = _copy(saved, tmp_path)
        _damage_step(directory, 12, kind, how)
        found, notes = _load(directory)
        _assert_fell_back(notes)
        _assert_restores(found, saved.restored[9])

    @pytest.mark.parametrize("kind, how", OTHER_DAMAGE)
    def test_damage_elsewhere_never_restores_a_wrong_state(self, saved, tmp_path, kind, how):
        directory = _copy(saved, tmp_path)
        _damage_step(directory, 12, kind, how)
        found, notes = _load(directory)
        if notes:
            _assert_fell_back(notes)
            _assert_restores(found, saved.restored[9])
        else:
            _assert_restores(found, saved.restored[12])

    @pytest.mark.parametrize("how", ["bit", "bytes"])
    def test_flipped_array_bytes_are_caught_by_the_checksums(self, saved, tmp_path, how):
        """orbax reads a flipped bit of array data back without complaint: wdjax's own
        verification (CRC-32 per leaf, finite values) is what refuses it."""
        directory = _copy(saved, tmp_path)
        (largest,) = _damage_step(directory, 12, "largest data file", how)
        assert "state" in largest.relative_to(directory).parts
        found, notes = _load(directory)
        _assert_fell_back(notes)
        assert "checksums do not match" in notes[0] or "non-finite values" in notes[0]

    @pytest.mark.parametrize(
        "kind, how",
        [("largest data file", "bit"), ("meta json", "garbage"), ("ocdbt manifest", "delete")],
    )
    def test_none_verifies(self, saved, tmp_path, kind, how):
        directory = _copy(saved, tmp_path)
        for step in (12, 9):
            _damage_step(directory, step, kind, how)
        notes: list[str] = []
        with checkpoint.Checkpointer(directory, EVERY, log=notes.append) as ckpt:
            with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* verifies"):
                ckpt.load(_like())
        assert [n.split(" in ")[0] for n in notes] == ["checkpoint step 12", "checkpoint step 9"]

    @pytest.mark.parametrize(
        "kind, how",
        [("largest data file", "bit"), ("meta json", "garbage"), ("ocdbt manifest", "delete")],
    )
    def test_fit_resumes_from_the_previous_one(self, saved, tmp_path, kind, how):
        directory = _copy(saved, tmp_path)
        _damage_step(directory, 12, kind, how)
        notes: list[str] = []
        with checkpoint.Checkpointer(directory, EVERY, keep=2, log=notes.append) as ckpt:
            result = train.fit(
                TASK, OPT, DATA, epochs=2, batch_size=BATCH, checkpoints=ckpt, progress=False
            )
        _assert_fell_back(notes)
        assert np.isfinite(result.history[-1]["loss"]) and not result.diverged
        assert result.history == saved.result.history
        assert _same(result.state, saved.result.state)

    def test_a_damaged_checkpoint_is_rewritten_when_the_run_passes_its_step(self, saved, tmp_path):
        directory = _copy(saved, tmp_path)
        _damage_step(directory, 12, "largest data file", "bit")
        with checkpoint.Checkpointer(directory, EVERY, keep=2, log=lambda _: None) as ckpt:
            train.fit(TASK, OPT, DATA, epochs=2, batch_size=BATCH, checkpoints=ckpt, progress=False)
        found, notes = _load(directory)
        assert notes == [] and found.step == 12

    def test_rotation_keeps_the_good_checkpoint_while_a_newer_one_is_bad(
        self, saved, tmp_path, monkeypatch
    ):
        directory = _copy(saved, tmp_path)
        (damaged,) = _damage_step(directory, 12, "largest data file", "bit")
        bad_bytes = damaged.read_bytes()
        listings = []

        def record(point: str, step: int) -> None:
            bad = damaged.exists() and damaged.read_bytes() == bad_bytes
            steps = {int(p.name) for p in directory.iterdir() if p.name.isdigit()}
            listings.append((point, step, sorted(steps), bad))

        monkeypatch.setattr(checkpoint, "_fault_hook", record)
        with checkpoint.Checkpointer(directory, EVERY, keep=2, log=lambda _: None) as ckpt:
            result = train.fit(
                TASK, OPT, DATA, epochs=4, batch_size=BATCH, checkpoints=ckpt, progress=False
            )
        assert len(result.history) == 4 and listings
        for point, step, steps, bad in listings:
            assert not bad or 9 in steps, f"at {point} of step {step}: {steps}, 12 damaged"


# ========================================================================== 2
# Resuming with other options


def _resume(baseline: Baseline, tmp_path: pathlib.Path, *changes: str, epochs: int = 7) -> int:
    """`--resume` the baseline run (6 epochs) in a copy of its --out, in-process."""
    out = tmp_path / "run"
    shutil.copytree(baseline.out, out)
    return cli.main([*_args(epochs), *CKPT_ARGS, "--out", str(out), "--resume", *changes])


@pytest.mark.slow  # resumes the baseline run
class TestResumeWithOtherOptions:
    """`--resume` compares the stored configuration: a changed option is an error that
    lists the differences; `--new-hyperparams` applies a changed η or λ and records it."""

    @pytest.mark.parametrize(
        "changes, fragments",
        [
            (["--lr", "0.01"], ["--lr 0.001 → 0.01", "pass --new-hyperparams"]),
            (["--weight-decay", "0.01"], ["--weight-decay 0.0001 → 0.01", "--new-hyperparams"]),
            (
                ["--lr", "0.01", "--weight-decay", "0.01"],
                ["--lr 0.001 → 0.01", "--weight-decay 0.0001 → 0.01"],
            ),
            (["--widths", "16"], ["--widths [32, 32] → [16]"]),
            (["--widths", "16", "--new-hyperparams"], ["--widths [32, 32] → [16]"]),
            (
                ["--lr", "0.01", "--widths", "16", "--new-hyperparams"],
                ["--lr 0.001 → 0.01", "--widths [32, 32] → [16]"],
            ),
            (["--seed", "1", "--new-hyperparams"], ["--seed 0 → 1"]),
            (["--schedule", "cosine", "--new-hyperparams"], ["--schedule constant → cosine"]),
            (["--optimizer", "sgdw", "--new-hyperparams"], ["--optimizer adamw → sgdw"]),
        ],
    )
    def test_differences_are_listed(self, baseline, tmp_path, capsys, changes, fragments):
        assert _resume(baseline, tmp_path, *changes) == 2
        err = capsys.readouterr().err
        _one_error_line(err, "--resume with other options", *fragments)
        if "--new-hyperparams" in changes:
            assert "pass --new-hyperparams" not in err
        assert _records(tmp_path / "run") == baseline.records  # nothing trained or written

    def test_fewer_epochs_than_were_run(self, baseline, tmp_path, capsys):
        assert _resume(baseline, tmp_path, epochs=5) == 2
        _one_error_line(
            capsys.readouterr().err, "checkpoint is at step 24", "5 epochs", "at least 6"
        )

    @pytest.mark.parametrize(
        "flag, value, name, factor",
        [
            ("--weight-decay", 1e-3, "weight_decay", 1e-3 * 1e-3),  # c·λ = η·λ
            ("--lr", 1e-2, "learning_rate", 1e-2 * 1e-4),
        ],
    )
    def test_new_hyperparams_are_applied_and_recorded(
        self, baseline, tmp_path, flag, value, name, factor
    ):
        assert _resume(baseline, tmp_path, flag, str(value), "--new-hyperparams") == 0
        records = _records(tmp_path / "run")
        assert len(records) == 7 and records[:6] == baseline.records
        assert all("hyperparams_set" not in r for r in records[:6])
        assert records[6]["hyperparams_set"] == {name: value}
        assert records[6][name] == pytest.approx(value, rel=1e-6)
        assert records[6]["decay_factor"] == pytest.approx(factor, rel=1e-5)
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["hyperparams_set_on_resume"] == {name: value}

    @pytest.mark.parametrize(
        "rerun",
        [
            pytest.param(
                ["--resume"],
                id="resume",
            ),
            pytest.param(
                [],
                id="rerun",
            ),
        ],
    )
    def test_after_a_crash_before_the_first_checkpoint(self, tmp_path, capsys, monkeypatch, rerun):
        """What a run killed before its first checkpoint leaves: config.json, and a
        checkpoints directory holding nothing but its lock file."""
        out = tmp_path / "run"
        argv = [*_args(1), "--checkpoint-every", "2", "--out", str(out)]
        with monkeypatch.context() as patch:
            patch.setattr(data, "load", _crash)  # config.json is written before the data
            assert cli.main(argv) == 2
        checkpoint.Checkpointer(out / "checkpoints", 2).close()
        capsys.readouterr()
        code = cli.main([*argv, *rerun])
        err = capsys.readouterr().err
        if rerun:  # resuming nothing: an error, or a note that it starts from step 0
            assert (code == 2 and err.count("\n") == 1) or (code == 0 and "checkpoint" in err), err
        else:  # the directory holds no checkpoint: nothing to refuse
            assert code == 0 or "already holds checkpoints" not in err, err


def _crash(*args: Any, **kwargs: Any) -> None:
    raise OSError(28, "No space left on device")


# ========================================================================== 3 and 4
# Bad scheduled hyperparameters, overflowing updates, decay factors >= 1

K = 3  # the bad step (0-based), in the first epoch of 6 steps


def _bad_at(value: float, good: float) -> Callable[[jax.Array], jax.Array]:
    return lambda count: jnp.where(count == K, value, good)


def _linear(params: dict, batch: dict) -> jax.Array:
    return jnp.mean(batch["x"] @ params["w"]["kernel"])


# A finite loss whose gradient is 100 everywhere: η = 1e38 makes the update -1e40 = -inf.
STEEP = tasks.task(lambda key: {"w": {"kernel": jnp.zeros((32, 1))}}, _linear, name="steep")
STEEP_DATA = ({"x": np.full((48, 32), 100.0, np.float32)}, {"x": np.ones((16, 32), np.float32)})

# name: (task, data, optimizer factory, what TrainingError names; None: no error)
SCHEDULES: dict[str, tuple] = {
    "lr nan": (TASK, DATA, lambda: wdjax.adamw(_bad_at(jnp.nan, 1e-2), 1e-3), "learning rate"),
    "lr inf": (TASK, DATA, lambda: wdjax.adamw(_bad_at(jnp.inf, 1e-2), 1e-3), "learning rate"),
    "lr negative": (TASK, DATA, lambda: wdjax.adamw(_bad_at(-1e-2, 1e-2), 1e-3), "learning rate"),
    "wd nan": (TASK, DATA, lambda: wdjax.adamw(1e-2, _bad_at(jnp.nan, 1e-3)), "weight decay"),
    "wd negative": (TASK, DATA, lambda: wdjax.adamw(1e-2, _bad_at(-1e-3, 1e-3)), "weight decay"),
    "sgdw lr nan": (
        TASK,
        DATA,
        lambda: wdjax.sgdw(_bad_at(jnp.nan, 1e-2), 1e-3, momentum=0.9),
        "learning rate",
    ),
    # c·λ = 1e-2 · 200 = 2: w ← (1 − 2)·w would flip every decayed weight
    "wd flips signs": (TASK, DATA, lambda: wdjax.adamw(1e-2, _bad_at(200.0, 1e-3)), "decay factor"),
    "update overflows": (
        STEEP,
        STEEP_DATA,
        lambda: wdjax.sgdw(_bad_at(1e38, 1e-3), 0.0),
        None,  # η = 1e38 is a valid value: the step is skipped, the run goes on
    ),
}
HYPERPARAM_CASES = [name for name, case in SCHEDULES.items() if case[3] is not None]


@functools.cache
def _stepwise(name: str) -> tuple[list, list[dict]]:
    """States before each of 6 steps and after the last, and each step's metrics."""
    task, (train_data, _), make, _ = SCHEDULES[name]
    opt = make()
    step = jax.jit(train.make_train_step(task, opt))
    state = train.init_state(task, opt, jax.random.PRNGKey(0))
    batch = jax.tree.map(lambda a: jnp.asarray(a[:BATCH]), train_data)
    states, metrics = [state], []
    for _ in range(STEPS_PER_EPOCH):
        state, m = step(state, batch)
        states.append(state)
        metrics.append(jax.device_get(m))
    return states, metrics


class TestBadStepsAreSkipped:
    """A step whose scheduled η or λ is NaN, infinite or negative, whose decay factor c·λ
    reaches 1, or whose update overflows is skipped (params unchanged, `skipped` counts
    it); `fit` stops at the end of the epoch with a `TrainingError` naming the step."""

    @pytest.mark.parametrize("name", list(SCHEDULES))
    def test_the_bad_step_is_skipped(self, name):
        states, metrics = _stepwise(name)
        assert all(int(s.skipped) == 0 for s in states[: K + 1])
        for before, after in zip(states[:K], states[1 : K + 1], strict=True):
            assert not _same(before.params, after.params)  # good steps are applied
        assert _same(states[K + 1].params, states[K].params)
        # moments, η, λ and Adam's count stay; the count the schedules read moves on
        before, after = states[K].opt_state, states[K + 1].opt_state
        assert _same(float_leaves(after), float_leaves(before))
        assert _adam_counts(after) == _adam_counts(before)
        assert int(after.count) == int(before.count) + 1
        assert int(states[K + 1].skipped) == 1 and int(metrics[K]["skipped"]) == 1
        assert int(states[K + 1].step) == K + 1
        assert all(_finite(s.params) for s in states)

    @pytest.mark.parametrize("name", list(SCHEDULES))
    def test_only_the_bad_step_is_skipped(self, name):
        """The schedules move on over a skipped step, so the next step is good again."""
        states, _ = _stepwise(name)
        assert not _same(states[K + 2].params, states[K + 1].params)
        assert int(states[-1].skipped) == 1 and all(_finite(s.params) for s in states)

    @pytest.mark.parametrize("name", HYPERPARAM_CASES)
    def test_fit_stops_naming_the_step(self, name):
        task, data_, make, what = SCHEDULES[name]
        with pytest.raises(train.TrainingError, match=rf"^at step {K} the {what} was "):
            train.fit(task, make(), data_, epochs=2, batch_size=BATCH, progress=False)

    def test_fit_with_an_overflowing_update_goes_on(self):
        task, data_, make, _ = SCHEDULES["update overflows"]
        result = train.fit(task, make(), data_, epochs=2, batch_size=BATCH, progress=False)
        assert _finite(result.state.params) and result.history[0]["skipped"] >= 1

    def test_fit_with_an_overflowing_update_skips_one_step(self):
        task, data_, make, _ = SCHEDULES["update overflows"]
        result = train.fit(task, make(), data_, epochs=2, batch_size=BATCH, progress=False)
        assert result.history[-1]["skipped"] == 1


# ------------------------------------------------------------------ replayed stretches

_X_NAN = _X[:48].copy()
_X_NAN[5, 7] = np.nan  # one example: the batch that holds it has a NaN loss, every epoch


def _init_spare(key: jax.Array) -> dict:
    return {**_init(key), "spare": {"bias": jnp.zeros(4)}}  # no gradient ever reaches it


# name: (task, data, optimizer factory, epochs): a fault the unguarded step applies
REPLAYED = {
    "nan example": (TASK, ({"x": _X_NAN, "y": _Y[:48]}, DATA[1]), lambda: OPT, 2),
    "update overflows": (*SCHEDULES["update overflows"][:3], 2),
    # Adam with ε = 0 on a zero gradient: 0/0; loss, gradients and η are finite,
    # only the state shows it (the guarded run skips every step)
    "0/0 update": (tasks.task(_init_spare, _mse), DATA, lambda: optax.adam(1e-2, eps=0.0), 2),
    "lr nan": (*SCHEDULES["lr nan"][:3], 2),
}


def _fit_or_error(name: str, guard: str) -> Any:
    task, data_, make, epochs = REPLAYED[name]
    try:
        return train.fit(
            task, make(), data_, epochs=epochs, batch_size=BATCH, progress=False, guard=guard
        )
    except train.TrainingError as e:
        return str(e)


class TestReplayedStretches:
    """`fit(guard="replay")` runs unguarded steps and replays a stretch with a fault
    from its start with the guard: the run equals `guard="step"`'s, record for record,
    whatever the fault, and only the faulty stretches run twice."""

    @pytest.mark.parametrize("name", list(REPLAYED))
    def test_equals_the_guarded_run(self, name, monkeypatch):
        verdicts = []
        faulty = train.stretch_faulty
        monkeypatch.setattr(
            train,
            "stretch_faulty",
            lambda a, b: verdicts.append(bool(faulty(a, b))) or verdicts[-1],
        )
        replayed = _fit_or_error(name, "replay")
        guarded = _fit_or_error(name, "step")
        assert verdicts and verdicts[0]  # the first epoch has the fault, and was replayed
        if isinstance(guarded, str):
            assert replayed == guarded
            return
        assert [r.keys() for r in replayed.history] == [r.keys() for r in guarded.history]
        for a, b in zip(replayed.history, guarded.history, strict=True):
            np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5)
        for a, b in zip(*(jax.tree.leaves(r.state) for r in (replayed, guarded)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5)
        assert replayed.diverged == guarded.diverged and _finite(replayed.state.params)
        assert verdicts == [h["skipped"] > p for h, p in _skips(guarded.history)]


def _skips(history: list[dict]) -> list[tuple[dict, float]]:
    """Each epoch's record with the skipped count before it."""
    return list(zip(history, [0.0] + [h["skipped"] for h in history[:-1]], strict=True))


def _anchor() -> dict:
    return jax.tree.map(jnp.zeros_like, _init(jax.random.PRNGKey(0)))


class TestDecayThatFlipsSigns:
    """A concrete per-step decay factor c·λ ≥ 1 (w ← (1 − c·λ)·w zeroes or flips the
    weights) is refused when the transform is built; a schedule that reaches it at step
    k is caught there: the step is skipped and `fit` raises "at step k the decay factor
    was 2" (TestBadStepsAreSkipped, case "wd flips signs")."""

    @pytest.mark.parametrize(
        "build",
        [
            lambda: wdjax.decoupled_weight_decay(1e6, lr_coupling="constant"),
            lambda: wdjax.decoupled_weight_decay(1.0, lr_coupling="constant"),
            lambda: wdjax.decoupled_weight_decay(20.0, learning_rate=0.1),
            lambda: wdjax.decoupled_weight_decay(2.0, learning_rate=1.0, lr_coupling="schedule"),
            lambda: wdjax.decoupled_weight_decay(2.0, learning_rate=1.0, lr_coupling="corrected"),
            lambda: wdjax.decoupled_weight_decay(
                {"dense": 0.5, "head": 2.0}, lr_coupling="constant"
            ),
            lambda: wdjax.decay_toward(_anchor(), 2.0, lr_coupling="constant"),
            lambda: wdjax.adamw(1.0, 10.0),
            lambda: wdjax.adamw(1.0, 1.0),
            lambda: wdjax.sgdw(1.0, 10.0),
            lambda: wdjax.lionw(1.0, 10.0),
            lambda: wdjax.adamw(0.1, wdjax.rates({"head/*": 20.0}, default=1e-4)),
            lambda: wdjax.adamw(0.1, wdjax.rates({"head/*": 1e-4}, default=20.0)),
            lambda: wdjax.decoupled_weight_decay(
                wdjax.rates({"head/*": 2.0}), lr_coupling="constant"
            ),
        ],
    )
    def test_refused_at_construction(self, build):
        with pytest.raises(ValueError, match=r"per-step decay factor c·λ = .* is >= 1"):
            build()

    @pytest.mark.parametrize(
        "build",
        [
            lambda: wdjax.decoupled_weight_decay(0.999, lr_coupling="constant"),
            lambda: wdjax.adamw(1.0, 0.5),
            lambda: wdjax.adam_l2(1.0, 10.0),  # coupled L2: λ is not a shrink factor
            lambda: wdjax.sgd_l2(1.0, 10.0),
        ],
    )
    def test_below_one_or_coupled_is_accepted(self, build):
        build()


# ========================================================================== 5 and 9
# Outputs that cannot be written, and a directory another run holds


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the CLI gets as far as loading data."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the CLI loaded data before checking its --out")

    monkeypatch.setattr(data, "load", refuse)


def _quick_error(argv: list[str], capsys: pytest.CaptureFixture, *fragments: str) -> None:
    start = time.monotonic()
    assert cli.main(argv) == 2
    assert time.monotonic() - start < 5
    _one_error_line(capsys.readouterr().err, *fragments)


class TestOutputsCheckedFirst:
    """`--out` is created, probed for writing and locked before any data is loaded."""

    @pytest.mark.parametrize("command", ["train", "sweep"])
    def test_out_is_an_existing_file(self, command, tmp_path, capsys, no_training):
        taken = tmp_path / "taken"
        taken.write_text("keep me")
        _quick_error([command, "--out", str(taken)], capsys, "exists and is not a directory")
        assert taken.read_text() == "keep me" and not list(tmp_path.rglob("*.json"))

    @pytest.mark.parametrize("command", ["train", "sweep"])
    def test_out_under_an_existing_file(self, command, tmp_path, capsys, no_training):
        taken = tmp_path / "taken"
        taken.write_text("")
        _quick_error([command, "--out", str(taken / "run")], capsys)

    @pytest.mark.parametrize("command", ["train", "sweep"])
    def test_unwritable_directory(self, command, tmp_path, capsys, no_training):
        if os.geteuid() == 0:
            pytest.skip("running as root: file permissions do not stop root")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            _quick_error([command, "--out", str(locked)], capsys, "Permission denied")
        finally:
            locked.chmod(0o700)

    @pytest.mark.parametrize("command", ["train", "sweep"])
    def test_directory_nobody_can_write(self, command, capsys, no_training):
        """/proc/self is a directory even root cannot create files in."""
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc")
        _quick_error([command, "--out", "/proc/self"], capsys, "wdjax-write-test")

    @pytest.mark.parametrize("command", ["train", "sweep"])
    def test_directory_held_by_another_run(self, command, tmp_path, capsys, no_training):
        lock = checkpoint.DirectoryLock(tmp_path / "run")
        try:
            _quick_error(
                [command, "--out", str(tmp_path / "run")],
                capsys,
                "in use by another wdjax run",
                f"pid {os.getpid()}",
            )
        finally:
            lock.release()
        assert not (tmp_path / "run" / "config.json").exists()

    def test_directory_held_by_another_process(self, tmp_path):
        lock = checkpoint.DirectoryLock(tmp_path / "run")
        try:
            proc = _run(["train", "--out", str(tmp_path / "run")])
        finally:
            lock.release()
        assert proc.returncode == 2
        _one_error_line(proc.stderr, "in use by another wdjax run", f"pid {os.getpid()}")
        assert not (tmp_path / "run" / "config.json").exists()

    def test_a_failed_run_releases_its_locks(self, tmp_path, monkeypatch):
        out = tmp_path / "run"
        monkeypatch.setattr(train, "fit", _crash)  # fails once the Checkpointer exists
        assert cli.main([*_args(1), "--checkpoint-every", "2", "--out", str(out)]) == 2
        for directory in (out, out / "checkpoints"):
            checkpoint.DirectoryLock(directory).release()

    def test_the_lock_dies_with_its_process(self, tmp_path):
        """No stale lock after a run is killed: the next one takes the directory."""
        code = "import os, sys, wdjax.lab.checkpoint as c; c.DirectoryLock(sys.argv[1]); "
        code += "os.kill(os.getpid(), 9)"
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], timeout=120)
        assert proc.returncode == -9 and (tmp_path / "run" / ".wdjax.lock").exists()
        checkpoint.DirectoryLock(tmp_path / "run").release()


# ========================================================================== 6
# A validation loss that is never finite


def _nan_metrics(params: dict, batch: dict) -> dict:
    return {"loss": jnp.full(batch["x"].shape[:1], jnp.nan)}


def _inf_metrics(params: dict, batch: dict) -> dict:
    return {"loss": jnp.full(batch["x"].shape[:1], jnp.inf)}


def _nan_loss(params: dict, batch: dict) -> jax.Array:
    return _mse(params, batch) * jnp.nan


class TestNeverFiniteValidation:
    """Early stopping never sees an improvement: `fit` still returns a finite state
    (not None) and says the run diverged."""

    @pytest.mark.parametrize(
        "loss, metrics, patience, epochs",
        [
            (_mse, _nan_metrics, 2, 5),
            (_mse, _inf_metrics, 2, 5),
            (_mse, _nan_metrics, None, 2),
            (_nan_loss, None, 2, 5),  # every step skipped: the state stays the initial one
        ],
        ids=["nan val, patience", "inf val, patience", "nan val, no patience", "nan loss"],
    )
    def test_returns_a_finite_state_and_diverged(self, loss, metrics, patience, epochs):
        task = tasks.task(_init, loss, metrics=metrics)
        result = train.fit(
            task, OPT, DATA, epochs=epochs, batch_size=BATCH, patience=patience, progress=False
        )
        assert result.state is not None and _finite(result.state.params)
        assert result.diverged
        assert result.stopped_early == (patience is not None)
        assert len(result.history) == (patience or epochs)


# ========================================================================== 7
# Killed during a checkpoint write


def _mid_write_supported() -> bool:
    try:
        module = importlib.import_module("orbax.checkpoint._src.path.atomicity")
    except ImportError:
        return False
    return hasattr(getattr(module, "AtomicRenameTemporaryPath", None), "finalize")


KILL_POINTS = [
    "before_write",
    "after_write",
    "after_verify",
    pytest.param(
        "mid_write",
        marks=pytest.mark.skipif(
            not _mid_write_supported(), reason="orbax has no AtomicRenameTemporaryPath"
        ),
    ),
]


@pytest.mark.slow
class TestKilledDuringACheckpointWrite:
    """SIGKILL at each point of the write of the mid-epoch checkpoint at step 18; the
    resumed run's metrics.jsonl equals the uninterrupted run's, record for record."""

    @pytest.mark.parametrize("point", KILL_POINTS)
    def test_resume_equals_the_uninterrupted_run(self, baseline, jax_cache, tmp_path, point):
        out = tmp_path / "run"
        argv = [*CLI_ARGS, *CKPT_ARGS, "--out", str(out)]
        killed = _run(argv, jax_cache, fault=("kill", point, 18))
        assert killed.returncode == -9, killed.stderr
        assert not (out / "metrics.jsonl").exists()
        resumed = _run([*argv, "--resume"], jax_cache)
        assert resumed.returncode == 0, resumed.stderr
        assert "Traceback" not in resumed.stderr
        assert _records(out) == baseline.records
        summary = json.loads((out / "summary.json").read_text())
        assert summary["results"] == baseline.summary["results"]

    @pytest.mark.parametrize("how", ["bit", "truncate"])
    def test_resume_past_a_damaged_checkpoint(self, baseline, jax_cache, tmp_path, how):
        """The CLI's notes about a damaged checkpoint are one line each."""
        out = tmp_path / "run"
        shutil.copytree(baseline.out, out)
        for name in ("metrics.jsonl", "summary.json"):
            (out / name).unlink()
        _damage_step(out / "checkpoints", 24, "largest data file", how)
        resumed = _run([*CLI_ARGS, *CKPT_ARGS, "--out", str(out), "--resume"], jax_cache)
        assert resumed.returncode == 0, resumed.stderr
        lines = resumed.stderr.strip().splitlines()
        notes = [line for line in lines if line.startswith("wdjax: ")]
        assert len(notes) == 2, resumed.stderr
        assert notes[0].startswith("wdjax: checkpoint step 24 in ") and "unusable" in notes[0]
        assert notes[1] == "wdjax: resuming from step 18, the newest checkpoint that verifies"
        assert _records(out) == baseline.records
        if how == "truncate" and len(lines) != 2:  # not every time: garbage-collection timing
            pytest.xfail(
                "BUG: when orbax raises while restoring (a truncated or missing file), its "
                "abandoned coroutines print 'Exception ignored in: <coroutine "
                "_read_array_index_and_device_put>' tracebacks with TensorStore specs, tens "
                f"to hundreds of lines ({len(lines)} here)"
            )
        assert lines == notes, resumed.stderr


# ========================================================================== 11
# A full disk


@pytest.fixture
def small_disk(tmp_path: pathlib.Path):
    """A 4 MiB tmpfs of our own (skipped where it cannot be mounted)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "wdjax-test", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _watch(
    argv: list[str], env: dict, fault: tuple[str, str, int], err_file: pathlib.Path
) -> tuple[int | None, str]:
    """Run the CLI through the fault launcher; `(exit status, stderr)`, the status None
    when the process was still alive 5 s after printing its error (then it is killed)."""
    cmd = [sys.executable, "-c", LAUNCHER, *fault[:2], str(fault[2]), *argv]
    with open(err_file, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    start, errored = time.monotonic(), None
    while proc.poll() is None:
        time.sleep(0.2)
        now = time.monotonic()
        if errored is None and "wdjax: error:" in err_file.read_text():
            errored = now
        if (errored is not None and now - errored > 5) or now - start > 240:
            proc.kill()
            proc.wait()
            return None, err_file.read_text()
    return proc.returncode, err_file.read_text()


@pytest.mark.slow
class TestDiskFull:
    """The disk fills up just before a checkpoint write: one line, exit 2; once there
    is space again, `--resume` gives the uninterrupted run's results."""

    def test_one_line_then_resume(self, baseline, jax_cache, small_disk, tmp_path):
        out, filler = small_disk / "run", small_disk / "filler"
        argv = [*CLI_ARGS, *CKPT_ARGS, "--out", str(out)]
        fault = (f"fill={filler}", "before_write", 12)  # the second checkpoint, mid-epoch 3
        code, err = _watch(argv, jax_cache, fault, tmp_path / "stderr")
        lines = err.strip().splitlines()
        errors = [line for line in lines if line.startswith("wdjax: error: ")]
        assert len(errors) == 1 and "No space left on device" in errors[0], err
        assert code in (2, None), err
        filler.unlink()
        resumed = _run([*argv, "--resume"], jax_cache)
        assert resumed.returncode == 0, resumed.stderr
        assert _records(out) == baseline.records
        # Neither of these happens every time (it depends on orbax's writer threads), so
        # they cannot be a strict xfail; the assertions above hold every time.
        if code is None:
            pytest.xfail(
                "BUG: after the error the process hangs at exit: orbax's non-daemon future "
                "threads wait for signals of the failed save (cmd_train never closes the "
                "Checkpointer when fit raises)"
            )
        if len(lines) != 1:
            pytest.xfail(
                "BUG: after the error orbax's background threads print 'RuntimeError: "
                "Event loop is closed' tracebacks at exit (the Checkpointer is not closed "
                "when fit raises):\n" + err
            )


# ========================================================================== 8
# A mask and a rate map that together select nothing

P = {
    "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    "head": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)},
}
NOTHING = [
    lambda: wdjax.adamw(1e-3, wdjax.rates({"head/*": 1e-3}), mask="dense/*"),
    lambda: wdjax.sgdw(1e-3, wdjax.rates({"head/kernel": 1e-3}), mask="dense/*"),
    lambda: wdjax.decoupled_weight_decay(
        wdjax.rates({"head/*": 1e-3}), "dense/*", learning_rate=1e-3
    ),
    lambda: wdjax.add_l2_gradient(wdjax.rates({"head/*": 1e-3}), "dense/*"),
]


class TestSelectsNothing:
    """A mask and a rate map that each match parameters but not the same ones leave
    nothing decayed: an error, not a silent no-op."""

    @pytest.mark.parametrize("build", NOTHING)
    def test_error_at_init(self, build):
        with pytest.raises(ValueError, match="together select nothing"):
            build().init(P)

    def test_overlapping_selections_are_fine(self):
        tx = wdjax.adamw(1e-3, wdjax.rates({"head/*": 1e-3}), mask="*/kernel")
        tx.update(jax.tree.map(jnp.ones_like, P), tx.init(P), P)

    @pytest.mark.parametrize(
        "build",
        [
            lambda: wdjax.adamw(1e-3, wdjax.rates({"nope/*": 1e-3})),
            lambda: wdjax.adamw(1e-3, 1e-3, mask="nope/*"),
        ],
    )
    def test_a_pattern_matching_nothing_is_an_error(self, build):
        with pytest.raises(ValueError, match="matches no parameter"):
            build().init(P)


# ========================================================================== 10
# Bad command lines

# (argv, what the one line says); {file}: an existing file, {empty}: an empty directory
BAD_ARGS = [
    (["train", "--checkpoint-every", "0"], "expected a value >= 1"),
    (["train", "--auto-decay-horizon", "0.5"], "expected a value >= 1.0"),
    (["train", "--compile-cache", "/proc/version/cache"], "--compile-cache /proc/version/cache"),
    (["train", "--auto-decay-horizon", "nan"], "expected a value >= 1.0"),
    (["train", "--momentum", "5", "--optimizer", "sgdw"], "expected a value >= 0.0 and < 1.0"),
    (["train", "--widths", "0"], "expected a value >= 1"),
    (["train", "--widths", "16,-4"], "expected a value >= 1"),
    (["train", "--out", "{file}"], "exists and is not a directory"),
    (["sweep", "--out", "{file}"], "exists and is not a directory"),
    (["sweep", "--batch-size", "0"], "expected a value >= 1"),
    (["sweep", "--folds", "0"], "expected a value >= 2"),
    (["sweep", "--folds", "1"], "expected a value >= 2"),
    (["sweep", "--chunk-size", "0"], "expected a value >= 1"),
    (["sweep", "--weight-decay", "0.1,abc"], "expected a float, got 'abc'"),
    (["sweep", "--seeds", "a"], "invalid list value"),
    (["train", "--lr", "abc"], "expected a float, got 'abc'"),
    (["train", "--weight-decay", "1e-3x"], "expected a float, got '1e-3x'"),
    (["train", "--lr", "nan"], "expected a value >= 0.0"),
    (["train", "--lr", "-0.001"], "expected a value >= 0.0"),
    (["train", "--lr", "inf"], "learning_rate must be finite"),
    (["train", "--weight-decay", "inf"], "weight_decay must be finite"),
    (["train", "--lr", "1", "--weight-decay", "10"], "per-step decay factor c·λ = 10 is >= 1"),
    (["train", "--epochs", "1.5"], "expected a int, got '1.5'"),
    (["train", "--batch-size", "0"], "expected a value >= 1"),
    (["train", "--dropout", "1"], "expected a value >= 0.0 and < 1.0"),
    (["train", "--clip-norm", "-1"], "expected a value >= 0.0"),
    (["train", "--patience", "0"], "expected a value >= 1"),
    (["train", "--warmup-epochs", "-1"], "expected a value >= 0.0"),
    (["train", "--penalty", "l2=-1"], "--penalty l2: expected a value >= 0.0"),
    (["train", "--penalty", "l2=nan"], "--penalty l2: expected a value >= 0.0"),
    (["train", "--penalty", "l2=abc"], "--penalty l2: expected a float"),
    (["train", "--penalty", "l4=1"], "--penalty l4: choose from"),
    (["train", "--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["train", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["sweep", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["train", "--optimizer", "sgd"], "invalid choice: 'sgd'"),
    (["train", "--dataset", "mnist", "--data-dir", "{empty}"], "mnist: expected"),
    (["masks", "--dataset", "mnist", "--data-dir", "{empty}"], "mnist: expected"),
    (["train", "--resume"], "--resume needs --checkpoint-every"),
    (["train", "--resume", "--checkpoint-every", "5"], "holds no checkpoint to resume from"),
    (["train", "--mask", "*/nothing"], "matches no parameter"),
    (["train", "--optimizer-config", "b1"], "expected key=value"),
    (["train", "--model-config", "depth=3"], "unknown config for mlp"),
    (["train", "--mesh", "data=3"], "needs 3 devices, there are 8"),
    (["train", "--mesh", "foo=2"], "unknown mesh axis 'foo'"),
    (["train", "--mesh", "data=-1,fsdp=-1"], "at most one mesh axis may be -1"),
    (["train", "--mesh", "data"], "is not name=size"),
    (["sweep", "--mesh", "data=0"], "a size must be >= 1"),
    (["train", "--mesh", "data=8", "--batch-size", "60"], "does not split over the layout's 8"),
    (["sweep", "--mesh", "members=4,data=2", "--batch-size", "63"], "layout's 2 data-parallel"),
    (["train", "--mesh", "members=8"], "members axis is for sweeps"),
    (["sweep", "--mesh", "members=4,fsdp=2"], "members and data axes only"),
    (["train", "--distributed", "localhost,2,0"], "expected HOST:PORT,PROCESSES,ID"),
    (["train", "--distributed", "localhost:1,2,5"], "expected HOST:PORT,PROCESSES,ID"),
    (["train", "--distributed", "localhost:1,two,0"], "expected auto or HOST:PORT"),
    (["train", "--compute-dtype", "int8"], "invalid choice: 'int8'"),
    (["train", "--fsdp-min-bytes", "-1"], "expected a value >= 0"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required"),
]


def _fill(argv: list[str], tmp_path: pathlib.Path) -> list[str]:
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir(exist_ok=True)
    return [a.format(file=tmp_path / "file", empty=tmp_path / "empty") for a in argv]


def _cli_process(argv: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, so its whole stderr can be inspected."""
    return subprocess.run(
        [sys.executable, "-m", "wdjax.lab.cli", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )


class TestBadCommandLines:
    """Every bad command line: exit status 2, exactly one line `wdjax: error: ...` on
    standard error, no traceback (`--debug` shows it)."""

    @pytest.mark.parametrize("argv, message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
    def test_one_line_exit_2(self, argv, message, tmp_path, capsys, monkeypatch):
        monkeypatch.chdir(tmp_path)
        assert cli.main(_fill(argv, tmp_path)) == 2
        captured = capsys.readouterr()
        _one_error_line(captured.err, message)

    @pytest.mark.parametrize(
        "argv, message",
        [
            (["train", "--momentum", "5"], "expected a value >= 0.0 and < 1.0"),
            (["train", "--out", "{file}"], "exists and is not a directory"),
            (["train", "--lr", "inf"], "learning_rate must be finite"),
            (["train", "--dataset", "mnist", "--data-dir", "{empty}"], "mnist: expected"),
        ],
    )
    def test_no_traceback_reaches_stderr(self, argv, message, tmp_path):
        proc = _cli_process(_fill(argv, tmp_path), tmp_path)
        assert proc.returncode == 2
        _one_error_line(proc.stderr, message)

    @pytest.mark.parametrize(
        "argv, error",
        [
            (["--debug", "train", "--out", "{file}"], "UsageError"),
            (["train", "--debug", "--dataset", "mnist", "--data-dir", "{empty}"], "DataError"),
        ],
    )
    def test_debug_shows_the_traceback(self, argv, error, tmp_path):
        proc = _cli_process(_fill(argv, tmp_path), tmp_path)
        assert proc.returncode != 0
        assert "Traceback (most recent call last)" in proc.stderr and error in proc.stderr
        assert "wdjax: error:" not in proc.stderr


# ========================================================================== 12
# API arguments outside their domain


SHAPE_CHECKED: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam_l2": lambda: wdjax.adam_l2(1e-3, 1e-2),
    "sgd_l2": lambda: wdjax.sgd_l2(1e-3, 1e-2, momentum=0.9),
    "sgdw": lambda: wdjax.sgdw(1e-3, 1e-2),
    "decoupled_weight_decay": lambda: wdjax.decoupled_weight_decay(1e-2, learning_rate=0.1),
    "add_l2_gradient": lambda: wdjax.add_l2_gradient(1e-2),
    "l1_proximal": lambda: wdjax.l1_proximal(1e-2, learning_rate=0.1),
    "max_norm": lambda: wdjax.max_norm(1.0),
    "adamw": lambda: wdjax.adamw(1e-3, 1e-2),
    "lionw": lambda: wdjax.lionw(1e-3),
    "sgdw momentum": lambda: wdjax.sgdw(1e-3, 1e-2, momentum=0.9),
}
WRONG_SHAPES: dict[str, Callable[[tuple], tuple]] = {
    "other rank": lambda s: (5,),
    "scalar": lambda s: (),
    "transposed": lambda s: s[::-1],
    "last axis": lambda s: s[-1:],
}


def _shape_cases() -> list:
    return [
        pytest.param(name, shape, id=f"{name}-{shape}")
        for name in SHAPE_CHECKED
        for shape in WRONG_SHAPES
    ]


class TestArgumentDomains:
    """Rates are real numbers (no bools, no strings), updates have the params' shapes,
    a zero η with a coupling that divides by it says so, float16 Adam makes no NaN."""

    @pytest.mark.parametrize(
        "build, message",
        [
            (lambda: wdjax.adamw(1e-3, "0.1"), "weight_decay must be a real number"),
            (lambda: wdjax.adamw("0.1", 1e-4), "learning_rate must be a real number"),
            (lambda: wdjax.adamw(1e-3, True), "weight_decay must be a real number"),
            (lambda: wdjax.adamw(1e-3, 1e-4, l1="0.1"), "l1 must be a real number"),
            (lambda: wdjax.sgdw(1e-3, momentum=True), "momentum must be a real number"),
            (lambda: wdjax.l2(True), "l2 rate must be a real number"),
            (lambda: wdjax.l2("0.1"), "l2 rate must be a real number"),
            (lambda: wdjax.l2(b"1"), "l2 rate must be a real number"),
            (lambda: wdjax.l2(1j), "l2 rate must be a real number"),
            (lambda: wdjax.l1(True), "l1 rate must be a real number"),
            (lambda: wdjax.elastic_net("0.1", 0.1), "l1 rate must be a real number"),
            (lambda: wdjax.rates({"head/*": True}), "rate for 'head/*' must be a real number"),
            (lambda: wdjax.rates({"head/*": "0.1"}), "rate for 'head/*' must be a real number"),
            (lambda: wdjax.rates({}, default=True), "default rate must be a real number"),
            (lambda: wdjax.decoupled_weight_decay(np.bool_(True)), "rate must be a real number"),
            (lambda: wdjax.add_l2_gradient("0.1"), "rate must be a real number"),
            (lambda: wdjax.l1_proximal(True, learning_rate=0.1), "rate must be a real number"),
            (lambda: wdjax.max_norm(True), "max_value must be a real number"),
            (lambda: wdjax.adamw(1e-3, float("nan")), "weight_decay must be finite"),
            (lambda: wdjax.adamw(float("inf")), "learning_rate must be finite"),
            (lambda: wdjax.adamw(1e-3, -1.0), "weight_decay must be >= 0"),
        ],
    )
    def test_bad_rates_are_refused(self, build, message):
        with pytest.raises(ValueError, match=re.escape(message)):
            build()

    @pytest.mark.parametrize(
        "build",
        [
            lambda: wdjax.adamw(1e-3, b1=2.0),
            lambda: wdjax.adamw(1e-3, b2=1.5),
            lambda: wdjax.adamw(1e-3, eps=-1.0),
            lambda: wdjax.lionw(1e-3, b1=-0.5),
        ],
    )
    def test_moment_coefficients_out_of_range(self, build):
        with pytest.raises(ValueError):
            build()

    @pytest.mark.parametrize("name, shape", _shape_cases())
    def test_updates_of_the_wrong_shape(self, name, shape):
        tx = SHAPE_CHECKED[name]()
        state = tx.init(P)
        kernel = P["dense"]["kernel"]  # (3, 2)
        wrong = {
            "dense": {"kernel": jnp.ones(WRONG_SHAPES[shape](kernel.shape)), "bias": jnp.ones(2)},
            "head": P["head"],
        }
        with pytest.raises(ValueError, match="shape"):
            tx.update(wrong, state, P)

    @pytest.mark.parametrize("coupling", ["schedule", "corrected"])
    @pytest.mark.parametrize(
        "build",
        [
            lambda c: wdjax.adamw(0.0, 1e-4, lr_coupling=c),
            lambda c: wdjax.sgdw(0.0, 1e-4, lr_coupling=c),
            lambda c: wdjax.adamw(1e-3, 1e-4, lr_coupling=c, max_learning_rate=0.0),
            lambda c: wdjax.decoupled_weight_decay(1e-4, learning_rate=0.0, lr_coupling=c),
        ],
    )
    def test_zero_learning_rate_with_a_schedule_coupling(self, build, coupling):
        with pytest.raises(ValueError, match=r"divides by η_max .*must be > 0, got 0\.0"):
            build(coupling)

    def test_zero_learning_rate_with_lr_coupling_is_fine(self):
        wdjax.adamw(0.0, 1e-4)

    @pytest.mark.parametrize(
        "build",
        [
            lambda: wdjax.adamw(1e-3, 1e-2),
            lambda: wdjax.adamw(1e-3, 1e-2, nesterov=True),
            lambda: wdjax.adamw(1e-3, 1e-2, eps=1e-12),
            lambda: wdjax.adam_l2(1e-3, 1e-2),
            lambda: wdjax.lionw(1e-3, 1e-2),
            lambda: wdjax.sgdw(1e-3, 1e-2, momentum=0.9),
        ],
    )
    @pytest.mark.filterwarnings("ignore:decay per step:RuntimeWarning")
    def test_float16_zero_gradients_give_no_nan(self, build):
        tx = build()
        params = jax.tree.map(lambda x: x.astype(jnp.float16), P)
        state = tx.init(params)
        for grads in (
            jax.tree.map(jnp.zeros_like, params),
            jax.tree.map(lambda x: jnp.zeros_like(x).at[..., 0].set(1e-4), params),
            jax.tree.map(jnp.zeros_like, params),
        ):
            updates, state = tx.update(grads, state, params)
            assert all(u.dtype == jnp.float16 for u in jax.tree.leaves(updates))
            assert _finite(updates), updates
            params = optax.apply_updates(params, updates)
        assert _finite(params) and _finite(state)
