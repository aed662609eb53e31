"""Scale-out: `fit`, checkpoints and sweeps on device meshes and across processes.

In-process tests use the eight CPU devices conftest.py asks for. Fresh-process tests
(another device count, two processes joined by `jax.distributed.initialize` with gloo
collectives) run tests/scale_worker.py or the CLI; they are marked slow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import SWEEP_GRID, scale_run
from jax.sharding import PartitionSpec as P
from jax.sharding import SingleDeviceSharding

import wdjax
from wdjax import distributed, masks
from wdjax import penalties as pen
from wdjax.lab import checkpoint, sweeps, tasks, train

HERE = pathlib.Path(__file__).parent
COLLECTIVES = re.compile(r"all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter")


@pytest.fixture(scope="module")
def run() -> dict:
    return scale_run()


def _fit(run: dict, epochs: int = 3, data=None, **kwargs):
    options = run["kwargs"] | kwargs
    data = run["data"] if data is None else data
    return train.fit(run["model"], run["optimizer"], data, epochs=epochs, **options)


@pytest.fixture(scope="module")
def one_device(run):
    """The reference: the run on one device, no layout."""
    return _fit(run)


def _layout(spec: str, **options) -> distributed.Layout:
    return distributed.Layout(distributed.make_mesh(spec), fsdp_min_bytes=0, **options)


def _rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ over all leaves (params as one vector)."""
    a, b = ([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)] for t in (a, b))
    diff = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b, strict=True)))
    return float(diff / np.sqrt(sum(np.sum(y**2) for y in b)))


def _assert_same_run(history, params, ref_history, ref_params, loss=1e-6, weights=1e-5):
    assert len(history) == len(ref_history)
    for h, r in zip(history, ref_history, strict=True):
        assert h["step"] == r["step"]
        assert h["loss"] == pytest.approx(r["loss"], rel=loss)
        assert h["val_loss"] == pytest.approx(r["val_loss"], rel=loss)
    assert _rel(params, ref_params) < weights


# ------------------------------------------------------------------ the Layout


@pytest.mark.parametrize(
    "spec, error",
    [
        ("data=3", "needs 3 devices, there are 8"),
        ("data=-1,fsdp=-1", "at most one mesh axis may be -1"),
        ("data=-1,fsdp=3", "8 devices do not divide by 3"),
        ("batch=8", "unknown mesh axis 'batch'"),
        ("data=0", "a size must be >= 1"),
        ("data", "is not name=size"),
        ("data=x", "is not name=size"),
        ("", "at least one axis"),
    ],
)
def test_make_mesh_refuses(spec, error, cpu_devices):
    with pytest.raises(ValueError, match=re.escape(error)):
        distributed.make_mesh(spec, cpu_devices)


@pytest.mark.parametrize(
    "spec, shape",
    [("data=-1", {"data": 8}), ("data=2,fsdp=-1", {"data": 2, "fsdp": 4}), ("members=8", {})],
)
def test_make_mesh_fills_the_rest(spec, shape, cpu_devices):
    mesh = distributed.make_mesh(spec, cpu_devices)
    assert dict(mesh.shape) == (shape or {"members": 8})


FSDP = {"x": {"fsdp": 4}}


@pytest.mark.parametrize(
    "path, shape, min_bytes, rules, spec",
    [
        ("a/kernel", (64, 32), 0, (), P("fsdp")),  # the largest divisible dimension
        ("a/kernel", (30, 64), 0, (), P(None, "fsdp")),  # 30 does not divide by 4
        ("a/kernel", (64, 64), 0, (), P(None, "fsdp")),  # a tie: the last dimension
        ("a/kernel", (30, 6), 0, (), P()),  # nothing divides: replicated
        ("a/kernel", (64, 32), 4 * 64 * 32 + 1, (), P()),  # below the size threshold
        ("a/bias", (32,), 0, (), P("fsdp")),
        ("count", (), 0, (), P()),
        ("embed/table", (64, 32), 0, (("embed/*", P("model", None)),), P("model", None)),
        ("a/kernel", (64, 32), 0, (("embed/*", P("model")),), P("fsdp")),  # no match: rule
    ],
)
def test_param_spec_table(path, shape, min_bytes, rules, spec, cpu_devices):
    mesh = distributed.make_mesh("fsdp=4,model=2", cpu_devices)
    layout = distributed.Layout(mesh, rules=rules, fsdp_min_bytes=min_bytes)
    assert layout.param_spec(path, jax.ShapeDtypeStruct(shape, jnp.float32)) == spec


def test_rules_must_name_mesh_axes(cpu_devices):
    mesh = distributed.make_mesh("data=8", cpu_devices)
    with pytest.raises(ValueError, match="names axes not in the mesh"):
        distributed.Layout(mesh, rules=(("*", P("model")),))


def test_optimizer_state_follows_its_params_by_path_and_shape(cpu_devices):
    layout = distributed.Layout(
        distributed.make_mesh("data=2,fsdp=4", cpu_devices), fsdp_min_bytes=0
    )
    params = {"a": {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(30)}, "b": jnp.ones((8, 8))}
    opt = optax.chain(wdjax.adamw(1e-3, 0.1, l1=1e-3), optax.scale_by_schedule(lambda t: 1.0))
    state = jax.eval_shape(opt.init, params)
    shardings = masks.leaves_with_paths(layout.shardings(state, params))
    specs = {p: s.spec for p, s in shardings if s is not None}  # None: DecayState's anchor
    assert specs["0/inner_state/1/mu/a/kernel"] == P("fsdp")
    assert specs["0/inner_state/1/nu/b"] == P(None, "fsdp")
    assert specs["0/inner_state/1/mu/a/bias"] == P()  # 30 does not split over 4
    replicated = [p for p in specs if p.endswith(("count", "learning_rate", "weight_decay"))]
    assert replicated and all(specs[p] == P() for p in replicated)


# ------------------------------------------------------------------------ fit


def test_data_parallel_fit_equals_one_device(run, one_device, cpu_devices):
    layout = _layout("data=8")
    result = _fit(run, layout=layout)
    _assert_same_run(
        result.history, result.state.params, one_device.history, one_device.state.params
    )
    expected = layout.shardings(result.state, result.state.params)
    leaves = jax.tree.leaves(result.state)
    assert [x.sharding for x in leaves] == jax.tree.leaves(expected)
    assert len(jax.tree.leaves(result.state)[0].sharding.device_set) == 8


def _no_single_device(tree) -> None:
    leaves = [(p, x) for p, x in masks.leaves_with_paths(tree) if x is not None]
    single = [p for p, x in leaves if isinstance(x.sharding, SingleDeviceSharding)]
    assert leaves and not single, single


def test_fsdp_state_is_created_sharded_and_fit_equals_one_device(run, one_device):
    layout = _layout("data=2,fsdp=4")
    state, shardings = train.init_state_on(
        layout, run["model"], run["optimizer"], jax.random.PRNGKey(3)
    )
    _no_single_device(state)
    specs = {p: x.sharding.spec for p, x in masks.leaves_with_paths(state) if x is not None}
    assert specs["params/dense0/kernel"] == P(None, "fsdp")  # (64, 64): a tie, the last
    assert specs["opt_state/0/inner_state/1/mu/dense0/kernel"] == P(None, "fsdp")

    result = _fit(run, layout=layout)
    _no_single_device(result.state)
    assert jax.tree.map(lambda x: x.sharding, result.state) == shardings
    _assert_same_run(
        result.history, result.state.params, one_device.history, one_device.state.params
    )


def test_host_feed_equals_the_device_path(run):
    layout = _layout("data=2,fsdp=4")
    host = _fit(run, epochs=2, layout=layout, feed="host")
    device = _fit(run, epochs=2, layout=layout)
    _assert_same_run(host.history, host.state.params, device.history, device.state.params)


@pytest.mark.parametrize("feed", ["device", "host"])
def test_a_sharded_run_replays_a_faulty_epoch_onto_its_layout(run, feed):
    """One NaN example: each epoch's batch that holds it is non-finite. Replayed from the
    sharded copy of the epoch's start, the run equals the guarded one, on the layout."""
    x = run["data"].x_train.copy()
    x[5, 0, 0, 0] = np.nan
    data = dataclasses.replace(run["data"], x_train=x)
    layout = _layout("data=2,fsdp=4")
    results = {
        guard: _fit(run, epochs=2, layout=layout, data=data, feed=feed, guard=guard)
        for guard in ("replay", "step")
    }
    replayed, guarded = results["replay"], results["step"]
    assert [h["skipped"] for h in replayed.history] == [1, 2]
    for a, b in zip(replayed.history, guarded.history, strict=True):  # the NaN batch's loss
        np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5)
    assert _rel(replayed.state.params, guarded.state.params) < 1e-5
    assert jax.tree.map(lambda a: a.sharding, replayed.state) == jax.tree.map(
        lambda a: a.sharding, guarded.state
    )


def test_batch_size_must_split_over_the_data_axes(run):
    with pytest.raises(ValueError, match="does not split over the layout's 8"):
        _fit(run, epochs=1, layout=_layout("data=8"), batch_size=60)


def test_mixed_precision_keeps_float32_master_weights(run, one_device):
    layout = _layout("data=8", compute_dtype=jnp.bfloat16)
    result = _fit(run, layout=layout)
    floats = [
        x.dtype for x in jax.tree.leaves(result.state) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert floats and set(floats) == {jnp.dtype(jnp.float32)}
    for h, r in zip(result.history, one_device.history, strict=True):
        assert h["loss"] == pytest.approx(r["loss"], rel=3e-2)  # bfloat16 forward pass
    assert result.history[-1]["loss"] != one_device.history[-1]["loss"]
    step = train.make_train_step(run["model"], run["optimizer"], layout=layout)
    batch = jax.tree.map(lambda a: a[:8], run["data"].arrays("train"))
    jaxpr = str(jax.make_jaxpr(step)(result.state, batch))
    assert re.search(r"dot_general\[[^\]]*\] [a-z]+:bf16", jaxpr) or "bf16[8," in jaxpr


def test_group_lasso_drift_is_confined_to_collapsing_groups(run):
    """Known: decoupled decay + an L2 and group-lasso *loss*, FSDP vs one device, drifts
    beyond float32 rounding after a few dozen steps (also with plain `optax.adamw`).
    The cause: a group the penalty is driving to zero has the gradient λ·w/‖w‖, whose
    direction comes from the few bits left in w; FSDP sums ‖w‖² and the data gradient
    in another order, and Adam's per-coordinate normalization turns those last-bit
    differences into ±η steps. So the drift lives in the collapsing groups (and the
    weights they feed), never in the loss; a proximal step would set those groups to
    exactly zero. Pinned here: losses agree to 1e-6, the worst weight lies in a group
    whose norm is below a tenth of the median, and all weights agree to 1e-2."""
    penalties = [pen.l2(1e-3), pen.group_lasso(1e-2, 0, "*/kernel")]
    opt = wdjax.adamw(1e-3, 1e-2)
    kw = dict(epochs=6, batch_size=64, progress=False, penalties=penalties)
    model = run["model"]
    ref = train.fit(model, opt, run["data"], **kw)
    got = train.fit(model, opt, run["data"], layout=_layout("data=2,fsdp=4"), **kw)
    _assert_same_run(got.history, got.state.params, ref.history, ref.state.params, weights=1e-2)
    worst, where = 0.0, None
    for (path, a), b in zip(
        masks.leaves_with_paths(got.state.params), jax.tree.leaves(ref.state.params), strict=True
    ):
        d = np.abs(np.asarray(a) - np.asarray(b))
        if path.endswith("kernel") and d.max() > worst:
            worst, where = d.max(), (path, np.asarray(b), np.unravel_index(d.argmax(), d.shape))
    if worst > 1e-5 * 0.3:  # beyond rounding: it must be in a collapsing group
        path, w, (i, j) = where
        norms = np.linalg.norm(w, axis=0)  # groups: the columns (axis 0 reduced)
        rows = np.linalg.norm(w, axis=1)  # the outgoing weights of a collapsing unit
        collapsing = norms < np.median(norms) / 10
        kernels = [
            np.asarray(k)
            for p, k in masks.leaves_with_paths(ref.state.params)
            if p.endswith("kernel")
        ]
        fed = any(
            np.linalg.norm(k, axis=0)[i] < np.median(np.linalg.norm(k, axis=0)) / 10
            for k in kernels
            if k.shape[1] == w.shape[0]
        )
        assert collapsing[j] or fed, (path, i, j, norms[j], np.median(norms), rows[i])


# ---------------------------------------------------------------- checkpoints


class _FakeManager:
    """Records the directory orbax is given (no network, no files)."""

    seen: list = []

    def __init__(self, directory, options=None):
        _FakeManager.seen.append(directory)

    def close(self):
        pass


@pytest.mark.parametrize("url", ["gs://bucket/run", "s3://bucket/a/b", "gs://b/x/../y"])
def test_checkpoint_urls_are_kept_as_given(url, monkeypatch, tmp_path):
    import orbax.checkpoint as ocp

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ocp, "CheckpointManager", _FakeManager)
    _FakeManager.seen = []
    ckpt = checkpoint.Checkpointer(url, every=1)
    assert ckpt.path == url and _FakeManager.seen == [url]
    ckpt.close()
    assert list(tmp_path.iterdir()) == []  # no local directory, no lock file


@pytest.mark.parametrize("asynchronous", [True, False])
def test_saves_do_not_block_training(run, tmp_path, monkeypatch, asynchronous):
    """Async: the write, its read-back and the rotation run in a background thread while
    training goes on (the hook holds that thread until the next epoch is done, which
    can only happen if training is not waiting for it); sync: inside `save`."""
    events, trained_on = [], threading.Event()

    def hook(point: str, step: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            trained_on.wait(timeout=60)
        events.append((point, step, threading.current_thread() is threading.main_thread()))

    def on_epoch(record: dict, _: dict) -> None:
        events.append(("epoch", record["step"], True))
        if record["step"] == 38:
            trained_on.set()

    monkeypatch.setattr(checkpoint, "_fault_hook", hook)
    ckpt = checkpoint.Checkpointer(tmp_path, every=19, asynchronous=asynchronous)
    with ckpt:
        _fit(run, epochs=2, checkpoints=ckpt, on_epoch=on_epoch)
    points = [(p, s) for p, s, _ in events]
    assert ("after_verify", 38) in points  # fit waits for its last checkpoint
    write_19, epoch_38 = points.index(("after_write", 19)), points.index(("epoch", 38))
    in_main = {main for p, _, main in events if p.startswith("after_")}
    if asynchronous:
        assert epoch_38 < write_19 and in_main == {False}
    else:
        assert write_19 < epoch_38 and in_main == {True}
    assert ckpt.steps() == [38, 19]


def test_resume_onto_another_layout_in_process(run, tmp_path):
    """Saved with FSDP over 8 devices, resumed replicated over 4 of them."""
    full = _fit(run, layout=_layout("data=2,fsdp=4"))
    with checkpoint.Checkpointer(tmp_path, every=19) as ckpt:
        _fit(run, epochs=2, layout=_layout("data=2,fsdp=4"), checkpoints=ckpt)
    four = distributed.Layout(distributed.make_mesh("data=4", jax.devices()[:4]))
    with checkpoint.Checkpointer(tmp_path, every=19) as ckpt:
        resumed = _fit(run, layout=four, checkpoints=ckpt)
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(resumed.state)} == {4}
    _assert_same_run(resumed.history, resumed.state.params, full.history, full.state.params)


def _worker(devices: int, out: pathlib.Path, *args: str, cluster: str | None = None):
    cmd = [sys.executable, str(HERE / "scale_worker.py"), str(devices), str(out), *args]
    if cluster:
        cmd += ["--cluster", cluster]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _finish(*procs) -> None:
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output[-3000:]


def _result(path: pathlib.Path) -> tuple[list, list]:
    r = json.loads(path.read_text())
    return r["history"], [np.asarray(x) for x in r["params"]]


def _params_list(params) -> list:
    return [np.asarray(x).ravel() for x in jax.tree.leaves(params)]


@pytest.mark.slow
def test_resume_in_fresh_processes_on_4_and_1_devices(run, tmp_path):
    """Saved on 8 devices with FSDP; resumed in fresh processes with 4 devices (FSDP
    over 2) and with 1 (no layout): each equals the uninterrupted 8-device run."""
    full = _fit(run, layout=_layout("data=2,fsdp=4"))
    saved = tmp_path / "saved"
    with checkpoint.Checkpointer(saved, every=7, keep=3) as ckpt:
        _fit(run, epochs=2, layout=_layout("data=2,fsdp=4"), checkpoints=ckpt)
    procs = []
    for devices, mesh in [(4, ["--mesh", "data=2,fsdp=2"]), (1, [])]:
        shutil.copytree(saved, tmp_path / f"ckpt{devices}")
        procs.append(
            _worker(
                devices,
                tmp_path / f"out{devices}.json",
                *mesh,
                "--ckpt",
                str(tmp_path / f"ckpt{devices}"),
            )
        )
    _finish(*procs)
    for devices in (4, 1):
        report = json.loads((tmp_path / f"out{devices}.json").read_text())
        assert report["devices"] == devices
        history, params = _result(tmp_path / f"out{devices}.json")
        _assert_same_run(history, params, full.history, _params_list(full.state.params))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(run, tmp_path):
    """Two processes x 4 CPU devices (jax.distributed, gloo): the guard refuses `fit`
    without a layout; with one, both processes see the same history, equal to the
    single-process 8-device run; their checkpoint then resumes in one process."""
    full = _fit(run, epochs=4, layout=_layout("data=2,fsdp=4"))
    address = f"localhost:{_free_port()}"
    ckpt = tmp_path / "ckpt"
    argv = ["--mesh", "data=2,fsdp=4", "--ckpt", str(ckpt), "--feed", "host", "--sweep"]
    procs = [_worker(4, tmp_path / f"p{i}.json", *argv, cluster=f"{address},2,{i}") for i in (0, 1)]
    _finish(*procs)
    reports = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(reports):
        assert r["process"] == i and r["processes"] == 2 and r["devices"] == 8
        assert "without a layout" in r["guard"] and "make_mesh" in r["guard"]
    assert reports[0]["history"] == reports[1]["history"]
    assert reports[0]["params"] == reports[1]["params"]
    # each process read only its half of every global batch (57 steps of 64 rows)
    assert [r["rows_read"] for r in reports] == [57 * 32, 57 * 32]
    # the member-sharded sweep: results gathered to both, equal to one process's sweep
    alone = wdjax.sweep(run["data"], model=run["model"], **SWEEP_GRID)
    for r in reports:
        np.testing.assert_allclose(r["sweep"]["val_loss"], alone.history["val_loss"], rtol=2e-5)
        assert r["sweep"]["chosen"] == alone.chosen_index
    _assert_same_run(
        reports[0]["history"], [np.asarray(x) for x in reports[0]["params"]],
        full.history[:3], _params_list(_fit(run, layout=_layout("data=2,fsdp=4")).state.params),
    )  # fmt: skip
    _finish(_worker(1, tmp_path / "one.json", "--ckpt", str(ckpt), "--epochs", "4"))
    history, params = _result(tmp_path / "one.json")
    _assert_same_run(history, params, full.history, _params_list(full.state.params))


GLOO_PHRASES = (
    "[Gloo] Rank",
    "is connected to",
    "peer ranks. Expected number of connected peer ranks is :",
)


@pytest.mark.slow
def test_cli_in_two_processes_writes_from_process_0_only(tmp_path):
    address = f"localhost:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    common = [
        "train",
        "--widths",
        "32",
        "--epochs",
        "2",
        "--no-progress",
        "--checkpoint-every",
        "19",
    ]
    common += ["--checkpoint-dir", str(tmp_path / "ckpt"), "--mesh", "data=-1"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wdjax.lab.cli",
                *common,
                "--out",
                str(tmp_path / f"out{i}"),
                "--distributed",
                f"{address},2,{i}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert not (tmp_path / "out1").exists()
    # the collectives library (gloo) announces each communicator from threads of its own,
    # writing its phrases and numbers one by one, so announcements interleave anywhere
    # between them ("[Gloo] Rank [Gloo] Rank 7 is connected to 6 is connected to ...");
    # without its phrases only the numbers may remain: wdjax itself is silent
    printed = outputs[1][0]
    for phrase in GLOO_PHRASES:
        printed = printed.replace(phrase, "")
    assert re.fullmatch(r"[\d\s]*", printed), outputs[1][0]
    assert "wrote" not in outputs[1][0] and "accuracy" not in outputs[1][0]
    summary = json.loads((tmp_path / "out0" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["layout"].startswith("mesh(data=8)")
    assert len((tmp_path / "out0" / "metrics.jsonl").read_text().splitlines()) == 2
    # one process, one device, one more epoch from the two processes' checkpoint, into a
    # new --out (as on another machine): the options are checked against the checkpoint's
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    common = [a for a in common if a not in ("--mesh", "data=-1")]
    common[common.index("--epochs") + 1] = "3"
    argv = [*common, "--out", str(tmp_path / "elsewhere"), "--resume"]
    resumed = subprocess.run(
        [sys.executable, "-m", "wdjax.lab.cli", *argv],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    records = [
        json.loads(x) for x in (tmp_path / "elsewhere" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    first = [json.loads(x) for x in (tmp_path / "out0" / "metrics.jsonl").read_text().splitlines()]
    assert records[:2] == first  # the two processes' history, carried by the checkpoint
    changed = [*argv, "--widths", "16"]  # another model: refused, in one line
    refused = subprocess.run(
        [sys.executable, "-m", "wdjax.lab.cli", *changed],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "--widths [32] → [16]" in refused.stderr


# --------------------------------------------------------------------- sweeps


SWEEP = dict(
    weight_decay=[0.0, 1e-2, 1e-1],
    learning_rate=[3e-3, 1e-2],
    epochs=2,
    batch_size=64,
    progress=False,
)


@pytest.fixture(scope="module")
def unsharded_sweep(run):
    return wdjax.sweep(run["data"], model=run["model"], **SWEEP)


@pytest.mark.parametrize("spec", ["members=8", "members=4,data=2"])
def test_member_sharded_sweep_equals_unsharded(run, unsharded_sweep, spec):
    layout = distributed.Layout(distributed.make_mesh(spec))
    got = wdjax.sweep(run["data"], model=run["model"], layout=layout, chunk_size=1, **SWEEP)
    members = layout.size("members")
    assert got.config["chunk_size"] == members  # per device: one member on each
    for k in ("loss", "val_loss", "val_accuracy", "weight_norm"):
        np.testing.assert_allclose(got.history[k], unsharded_sweep.history[k], rtol=2e-5, atol=1e-6)
    chex.assert_trees_all_close(got.params, unsharded_sweep.params, rtol=1e-4, atol=1e-6)
    assert got.chosen_index == unsharded_sweep.chosen_index


def _epoch_hlo(run, spec: str) -> str:
    layout = distributed.Layout(distributed.make_mesh(spec))
    task = tasks.as_task(run["model"])
    opt = wdjax.adamw(1e-3, 0.0)
    _, epoch = sweeps._program(task, opt, 64, (), masks.DEFAULT, layout)
    state = train.init_state(task, opt, jax.random.PRNGKey(0))
    state = layout.put(jax.tree.map(lambda a: jnp.stack([a] * 8), state), layout.members())
    train_data = layout.put(run["data"].arrays("train"), layout.replicated())
    val = layout.put(run["data"].arrays("val"), layout.replicated())
    return epoch.lower(state, train_data, None, val, None, 5).compile().as_text()


def test_the_member_sharded_epoch_has_no_collectives(run):
    assert not COLLECTIVES.findall(_epoch_hlo(run, "members=8"))
    # the check sees collectives where there are some: data parallel within each member
    assert "all-reduce" in COLLECTIVES.findall(_epoch_hlo(run, "members=4,data=2"))


def test_the_last_chunk_is_padded_to_the_member_axis(run):
    layout = distributed.Layout(distributed.make_mesh("members=4", jax.devices()[:4]))
    kw = SWEEP | {"weight_decay": [0.0, 1e-2, 1e-1], "learning_rate": [3e-3, 1e-2], "epochs": 1}
    got = wdjax.sweep(run["data"], model=run["model"], layout=layout, chunk_size=1, **kw)
    assert got.config["chunk_size"] == 4 and len(got.members) == 6  # chunks of 4: 4 + 2 (+2 pad)
    assert got.history["loss"].shape == (6, 1)


def test_sweep_warns_when_a_member_decay_underflows():
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    ridge = tasks.task(
        lambda key: {"w": jnp.ones((8, 4), jnp.bfloat16)},
        lambda p, b: jnp.mean((b["x"] @ p["w"].astype(jnp.float32)) ** 2),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wdjax.sweep({"x": x}, model=ridge, optimizer=wdjax.adamw(1e-3, 0.0, mask=masks.ALL),
                    weight_decay=[1e-4, 10.0], learning_rate=[1e-3], folds=2, epochs=1,
                    batch_size=16, progress=False)  # fmt: skip
    notes = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(notes) == 1 and "2 sweep member(s)" in notes[0] and "bfloat16" in notes[0]


def test_layout_guard_message_is_actionable(monkeypatch, run):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"2 processes without a layout.*make_mesh\('data=-1'\)"):
        _fit(run, epochs=1)


def test_describe_shows_shardings(cpu_devices, capsys):
    layout = distributed.Layout(distributed.make_mesh("fsdp=8", cpu_devices), fsdp_min_bytes=0)
    params = {"a": {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(32)}, "b": jnp.ones(3)}
    params = jax.device_put(params, layout.params(params))
    table = wdjax.describe(params, file=None)
    assert "sharding" in str(table).splitlines()[0]
    rows = {r.path: r.sharding for r in table.rows}
    assert rows == {"a/bias": "P('fsdp',)", "a/kernel": "P('fsdp',)", "b": "P()"}
    unsharded = str(wdjax.describe({"w": np.ones((2, 2))}, file=None))
    assert "sharding" not in unsharded.splitlines()[0]
