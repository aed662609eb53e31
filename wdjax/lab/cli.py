"""The wdjax command: train a reference model, sweep lambda, or show what a mask decays.

Bad input prints one line, "wdjax: error: ...", and exits with status 2.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import optax

from wdjax import distributed, masks, optimizers, penalties, transforms
from wdjax.hypergradient import Tuner
from wdjax.lab import checkpoint, data, models, report, train, variants

SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear")
MASKS = {"default": masks.DEFAULT, "all": masks.ALL, "none": masks.NONE}
PENALTIES = {
    "l2": penalties.l2,
    "l1": penalties.l1,
    "group_lasso": lambda rate, mask: penalties.group_lasso(rate, 0, mask),
}
DESCRIPTION = {
    "train": "Train a reference model on a dataset and report accuracy, loss, decay and norms.",
    "sweep": "Train a grid of weight decays (x learning rates x L1 rates x seeds x folds) "
    "as one program and choose one.",
    "masks": "Print which parameters of a reference model a mask decays.",
}


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog.removeprefix('wdjax').strip() or 'wdjax'}: {message}")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show."""


def _number(kind: type, low: float = 0.0, high: float | None = None, closed: bool = False) -> Any:
    """Parse a number in `[low, high)` (`[low, high]` with `closed`)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        above = value <= high if closed else value < high if high is not None else True
        if not (value >= low and above):  # also rejects NaN
            bound = "" if high is None else f" and {'<=' if closed else '<'} {high}"
            raise argparse.ArgumentTypeError(f"expected a value >= {low}{bound}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _list_of(item: Any) -> Any:
    def parse(text: str) -> list:
        values = [item(t) for t in text.split(",") if t.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values

    parse.__name__ = "list"
    return parse


def _assignment(text: str) -> tuple[str, Any]:
    """`key=value` with a Python literal value (`widths=128,128` is a tuple)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key.replace("-", "_"), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.replace("-", "_"), value


_rate = _number(float)


def _rate_or_auto(text: str) -> float | str:
    return "auto" if text == "auto" else _rate(text)


_count = _number(int, low=1)


def parse_mask(words: Sequence[str]) -> Any:
    """`default` | `all` | `none` | glob patterns -> a mask for [`wdjax.masks`][]."""
    if len(words) == 1 and words[0] in MASKS:
        return MASKS[words[0]]
    if any(w in MASKS for w in words):
        raise UsageError(f"--mask takes one of {', '.join(MASKS)} alone, or glob patterns")
    return masks.match(*words)


def _mesh(text: str) -> str:
    try:
        distributed.parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _cluster(text: str) -> str | tuple[str, int, int]:
    """`auto`, or `HOST:PORT,PROCESSES,ID` for `jax.distributed.initialize`."""
    if text == "auto":
        return text
    parts = text.split(",")
    try:
        address, processes, index = parts[0], int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected auto or HOST:PORT,PROCESSES,ID, got {text!r}"
        ) from None
    if len(parts) != 3 or ":" not in address or not 0 <= index < processes:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT,PROCESSES,ID, got {text!r}")
    return address, processes, index


def _scale_options(p: argparse.ArgumentParser, sweep: bool) -> None:
    g = p.add_argument_group("scale-out")
    g.add_argument(
        "--distributed",
        nargs="?",
        const="auto",
        type=_cluster,
        metavar="HOST:PORT,PROCESSES,ID",
        help="call jax.distributed.initialize() first: one process per host, found by JAX "
        "(TPU slices, SLURM...; automatic on a multi-host TPU slice) or given",
    )
    g.add_argument(
        "--mesh",
        type=_mesh,
        help="device mesh, axis=size with -1 for the rest: "
        + ("members=-1 or members=-1,data=2" if sweep else "data=-1 or data=-1,fsdp=4")
        + " (default: one device; required with several processes)",
    )
    g.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the forward and backward pass; params and optimizer state stay float32",
    )
    if not sweep:
        g.add_argument(
            "--fsdp-min-bytes",
            type=_number(int),
            default=4 * 2**20,
            help="params at least this large are split over the fsdp axis",
        )


def _layout(args: argparse.Namespace) -> distributed.Layout | None:
    if args.mesh is None:
        if args.compute_dtype != "float32":
            return distributed.Layout(
                distributed.make_mesh("data=1", jax.devices()[:1]),
                compute_dtype=args.compute_dtype,
            )
        return None
    options = {"fsdp_min_bytes": args.fsdp_min_bytes} if hasattr(args, "fsdp_min_bytes") else {}
    compute = None if args.compute_dtype == "float32" else args.compute_dtype
    return distributed.Layout(distributed.make_mesh(args.mesh), compute_dtype=compute, **options)


def _start_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize()` with `--distributed`, or on a multi-host TPU
    slice (several `TPU_WORKER_HOSTNAMES`), before JAX touches a device."""
    given = getattr(args, "distributed", None)
    if given is None and "," not in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk
    jax.distributed.initialize(*(() if given in (None, "auto") else given))


def _user_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wdjax", "jax")


def _compile_cache(args: argparse.Namespace) -> None:
    """Compiled programs are kept in `--compile-cache` across runs (unless `off`), so a
    second run of the same configuration compiles nothing."""
    where = getattr(args, "compile_cache", "off")
    if where == "off":
        return
    if "://" not in where:
        try:
            os.makedirs(where, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--compile-cache {where}: {e.strerror or e}") from None
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _writer() -> bool:
    """Only process 0 writes files and prints reports."""
    return jax.process_index() == 0


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=models.MODELS, default="mlp", help="reference model")
    g.add_argument(
        "--model-config",
        type=_assignment,
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="model options, checked against the model's factory "
        f"(mlp: {', '.join(models.config_names('mlp'))}; "
        f"cnn: {', '.join(models.config_names('cnn'))})",
    )
    g.add_argument("--widths", type=_list_of(_count), help="short for --model-config widths=...")
    g.add_argument("--dropout", type=_number(float, high=1.0), help="dropout rate in [0, 1)")
    g.add_argument("--batch-norm", action="store_true", help="batch normalization after layers")


def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=data.DATASETS, default="digits", help="dataset")
    g.add_argument(
        "--data-dir", help="directory with MNIST / Fashion-MNIST files (default: $WDJAX_DATA)"
    )
    g.add_argument("--download", action="store_true", help="download it (checksums verified)")
    g.add_argument(
        "--label-noise",
        type=_number(float, high=1.0, closed=True),
        default=0.0,
        help="replace this fraction of the training labels by another class (seeded)",
    )
    g.add_argument(
        "--train-fraction",
        type=_number(float, high=1.0, closed=True),
        default=1.0,
        help="keep this stratified fraction of the training set (seeded)",
    )


def _optim_options(p: argparse.ArgumentParser, sweep: bool) -> None:
    g = p.add_argument_group("optimizer and regularization")
    g.add_argument(
        "--optimizer", choices=tuple(optimizers.OPTIMIZERS), default="adamw", help="optimizer"
    )
    many = _list_of(_rate)
    if sweep:
        g.add_argument(
            "--weight-decay", type=many, default=[0.0, 1e-5, 1e-4, 1e-3, 1e-2], help="λ values"
        )
        g.add_argument("--lr", type=many, default=[1e-3], help="learning rates")
        g.add_argument("--l1", type=many, help="proximal L1 rates (default: no L1 step)")
    else:
        g.add_argument(
            "--weight-decay",
            type=_rate_or_auto,
            default=1e-4,
            help="λ of the optimizer, or auto: λ tunes itself by hypergradient steps on "
            "the validation split (from --auto-decay-init)",
        )
        g.add_argument(
            "--auto-decay-init", type=_rate, default=1e-4, help="starting λ of --weight-decay auto"
        )
        g.add_argument(
            "--auto-decay-lr",
            type=_number(float, low=1e-12),
            default=0.05,
            help="step in log λ per hypergradient step (--weight-decay auto)",
        )
        g.add_argument(
            "--auto-decay-horizon",
            type=_number(float, low=1.0),
            default=math.inf,
            help="steps the hypergradient looks back (--weight-decay auto): inf, the whole "
            "run (forward mode, ~2× a plain step), or 1, the last update only (T1–T2, "
            "~1.4×, biased toward small λ)",
        )
        g.add_argument("--lr", type=_rate, default=1e-3, help="learning rate η (peak)")
        g.add_argument("--l1", type=_rate, help="proximal L1 rate (default: no L1 step)")
    g.add_argument(
        "--lr-coupling",
        choices=transforms.COUPLINGS,
        help="what multiplies λ in decoupled decay: η_t (lr), η_t/η_max (schedule), "
        "η_t²/η_max (corrected) or 1 (constant); default lr",
    )
    g.add_argument("--max-learning-rate", type=_rate, help="η_max of the schedule coupling")
    g.add_argument(
        "--cautious", action="store_true", help="decay only where the step moves w toward 0"
    )
    g.add_argument("--momentum", type=_number(float, high=1.0), help="sgdw/sgd_l2; default 0.9")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (sgd*, adamw)")
    g.add_argument(
        "--optimizer-config",
        type=_assignment,
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="other optimizer keywords (b1=0.9 b2=0.95 eps=1e-8 ...)",
    )
    g.add_argument(
        "--mask", nargs="+", default=["default"], help="decayed leaves: default|all|none|globs"
    )
    g.add_argument(
        "--penalty",
        type=_assignment,
        nargs="+",
        default=[],
        metavar="NAME=RATE",
        help=f"penalties added to the loss, on the --mask leaves ({', '.join(PENALTIES)})",
    )
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_count, default=15 if sweep else 30, help="epochs")
    g.add_argument("--batch-size", type=_count, default=64, help="examples per step")
    g.add_argument("--seed", type=int, default=0, help="init, batch order and data split")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wdjax", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error, not one line"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, run: Any, training: bool = True) -> argparse.ArgumentParser:
        """A subcommand with the model and data options, and for training commands the
        optimizer options, `--out` and `--no-progress`."""
        p = sub.add_parser(
            name, help=DESCRIPTION[name], description=DESCRIPTION[name], formatter_class=_Help
        )
        p.set_defaults(run=run)
        p.add_argument("--debug", action="store_true", help="show tracebacks, not one line")
        p.add_argument(
            "--compile-cache",
            default=os.environ.get("WDJAX_COMPILE_CACHE")
            or os.environ.get("JAX_COMPILATION_CACHE_DIR")
            or _user_cache(),
            help="JAX's persistent compilation cache: a directory (or URL), or off "
            "(default: $WDJAX_COMPILE_CACHE, else $JAX_COMPILATION_CACHE_DIR, else "
            "%(default)s)",
        )
        _model_options(p)
        _data_options(p)
        if training:
            _optim_options(p, sweep=name == "sweep")
            _scale_options(p, sweep=name == "sweep")
            p.add_argument("--out", default=f"runs/{name}", help="output directory")
            p.add_argument("--no-progress", action="store_true", help="no progress bar")
        return p

    t = command("train", cmd_train)
    t.add_argument("--schedule", choices=SCHEDULES, default="constant", help="η schedule")
    t.add_argument("--warmup-epochs", type=_number(int), default=1, help="for warmup_cosine")
    t.add_argument("--clip-norm", type=_rate, help="clip gradients to this global norm")
    t.add_argument("--patience", type=_count, help="early stopping on the validation loss")
    t.add_argument("--checkpoint-every", type=_count, help="checkpoint interval in steps")
    t.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    t.add_argument(
        "--checkpoint-dir",
        help="where checkpoints go: a path or a URL such as gs://bucket/run (default: "
        "OUT/checkpoints)",
    )
    t.add_argument(
        "--new-hyperparams",
        action="store_true",
        help="on --resume, apply a changed --lr/--weight-decay/--l1 (recorded in the history)",
    )

    s = command("sweep", cmd_sweep)
    s.add_argument("--seeds", type=_list_of(int), default=[0], help="comma-separated seeds")
    s.add_argument("--folds", type=_number(int, low=2), help="k-fold cross-validation (k >= 2)")
    s.add_argument("--select", choices=("best", "one_se"), default="best", help="choice rule")
    s.add_argument("--metric", default=None, help="validation metric (default: accuracy)")
    s.add_argument("--chunk-size", type=_count, help="members per compiled chunk")

    m = command("masks", cmd_masks, training=False)
    m.add_argument("--mask", nargs="+", default=["default"], help="default|all|none|globs")
    return parser


def _dataset(args: argparse.Namespace, seed: int = 0) -> data.Dataset:
    """The dataset, then its `--train-fraction` and `--label-noise` variants."""
    ds = data.load(args.dataset, data_dir=args.data_dir, seed=seed, download=args.download)
    if args.train_fraction == 0:
        raise UsageError("--train-fraction must be > 0")
    if args.train_fraction < 1:
        ds = variants.subsample(ds, args.train_fraction, seed)
    if args.label_noise > 0:
        ds = variants.label_noise(ds, args.label_noise, seed)
    return ds


def _model(args: argparse.Namespace, ds: data.Dataset) -> models.Model:
    config = dict(args.model_config)
    shorthands = {"widths": args.widths, "dropout": args.dropout}
    shorthands["batch_norm"] = True if args.batch_norm else None
    config |= {k: v for k, v in shorthands.items() if v is not None}
    return models.create(
        args.model, input_shape=ds.input_shape, num_classes=ds.num_classes, **config
    )


def _optimizer_options(args: argparse.Namespace, mask: Any) -> dict[str, Any]:
    """Keyword arguments of the chosen optimizer; a flag it does not take is an error."""
    given = {
        "lr_coupling": args.lr_coupling,
        "max_learning_rate": args.max_learning_rate,
        "cautious": args.cautious or None,
        "momentum": args.momentum,
        "nesterov": args.nesterov or None,
    }
    options = {k: v for k, v in given.items() if v is not None} | dict(args.optimizer_config)
    accepted = inspect.signature(optimizers.OPTIMIZERS[args.optimizer]).parameters
    wrong = sorted(k for k in options if k not in accepted)
    if wrong:
        names = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise UsageError(f"{args.optimizer} does not take {names}")
    if "momentum" in accepted:
        options.setdefault("momentum", 0.9)
    return options | {"mask": mask}


def _penalties(args: argparse.Namespace, mask: Any) -> list[penalties.Penalty]:
    unknown = [name for name, _ in args.penalty if name not in PENALTIES]
    if unknown:
        raise UsageError(f"--penalty {unknown[0]}: choose from {', '.join(PENALTIES)}")
    out = []
    for name, rate in args.penalty:
        try:
            rate = _rate(str(rate))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--penalty {name}: {e}") from None
        out.append(PENALTIES[name](rate, mask))
    return out


def _out_dir(path: str) -> tuple[pathlib.Path, checkpoint.DirectoryLock | None]:
    """Create and lock the output directory before any training, so a bad path or a
    second run into it fails first (process 0 only: the others write nothing)."""
    out = pathlib.Path(path)
    if not _writer():
        return out, None
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".wdjax-write-test"
    probe.write_text("")  # an unwritable directory fails here, not after training
    probe.unlink()
    return out, checkpoint.DirectoryLock(out)


# Options that do not change what a run computes: they may differ on --resume.
_NOT_COMPUTATION = (
    "out", "resume", "no_progress", "epochs", "new_hyperparams", "debug",
    "distributed", "mesh", "fsdp_min_bytes", "checkpoint_dir",  # a resume may change the layout
    "compile_cache",
)  # fmt: skip
_HYPERPARAMS = {"lr": "learning_rate", "weight_decay": "weight_decay", "l1": "l1"}


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options that decide what a run computes, as JSON values."""
    chosen = {k: v for k, v in vars(args).items() if k not in (*_NOT_COMPUTATION, "run")}
    return json.loads(json.dumps(chosen, default=str), parse_constant=str)  # inf: "Infinity"


def _resume_changes(args: argparse.Namespace, stored: dict | None) -> dict[str, float]:
    """Compare this run's options with the stored run's. Returns the hyperparameters
    to set (with `--new-hyperparams`); any other difference is an error listing them."""
    if stored is None:
        raise UsageError(
            f"--resume: neither {args.out} nor its checkpoints hold the config of a wdjax train run"
        )
    now = _run_config(args)
    diffs = {k: (stored.get(k), v) for k, v in now.items() if stored.get(k) != v}
    listed = ", ".join(f"--{k.replace('_', '-')} {a} → {b}" for k, (a, b) in diffs.items())
    other = [k for k in diffs if k not in _HYPERPARAMS]
    if other or (diffs and not args.new_hyperparams):
        hint = "" if other else "; pass --new-hyperparams to apply them from here on"
        raise UsageError(f"--resume with other options than the stored run's: {listed}{hint}")
    if "lr" in diffs and args.schedule != "constant":
        raise UsageError("--new-hyperparams: --lr can change only with --schedule constant")
    return {_HYPERPARAMS[k]: v for k, (_, v) in diffs.items()}


def cmd_masks(args: argparse.Namespace) -> int:
    ds = _dataset(args)
    model = _model(args, ds)
    params, _ = jax.eval_shape(model.init, jax.random.PRNGKey(0))  # shapes: nothing runs
    print(f"{args.model} on {ds.summary()}; mask: {' '.join(args.mask)}")
    masks.describe(params, parse_mask(args.mask))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from wdjax.lab.sweeps import sweep

    out, lock = _out_dir(args.out)
    try:
        return _sweep(args, out, sweep)
    finally:
        if lock is not None:
            lock.release()


def _sweep(args: argparse.Namespace, out: pathlib.Path, sweep: Any) -> int:
    ds = _dataset(args, args.seed)
    mask = parse_mask(args.mask)
    result = sweep(
        ds, model=_model(args, ds), optimizer=args.optimizer,
        optimizer_config=_optimizer_options(args, mask), weight_decay=args.weight_decay,
        learning_rate=args.lr, l1=args.l1, seeds=args.seeds, folds=args.folds,
        fold_seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
        penalties=_penalties(args, mask), mask=mask, select=args.select, metric=args.metric,
        chunk_size=args.chunk_size, progress=not args.no_progress, layout=_layout(args),
    )  # fmt: skip
    if not _writer():
        return 0
    result.to_json(out / "sweep.json")
    print(result.table())
    _plot(lambda result, path: result.plot(path), result, out / "sweep.png")
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.png'}")
    return 0


def _schedule(args: argparse.Namespace, steps_per_epoch: int) -> Any:
    total = max(args.epochs * steps_per_epoch, 1)
    if args.schedule == "constant":
        return args.lr
    if args.schedule == "cosine":
        return optax.cosine_decay_schedule(args.lr, total)
    if args.schedule == "linear":
        return optax.linear_schedule(args.lr, 0.0, total)
    warmup = min(args.warmup_epochs * steps_per_epoch, total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, total)


def _decay_report(
    args: argparse.Namespace, options: dict, lr: Any, total_steps: int, final: dict
) -> dict[str, Any]:
    """What the optimizer's λ did, in its own terms: for decoupled decay the per-step
    shrink factor c_t·λ (not a penalty), for coupled L2 the gradient term λ·w."""
    norms = {k: final[k] for k in ("weight_norm_decayed", "weight_norm_other")}
    auto = args.weight_decay == "auto"
    lam = final["weight_decay"] if auto else args.weight_decay  # auto: the final λ
    how = (
        f"by hypergradient from λ₀ = {args.auto_decay_init:g}, horizon {args.auto_decay_horizon:g}"
    )
    tuned = {"tuned": how} if auto else {}
    if args.optimizer in ("adam_l2", "sgd_l2"):
        return {"kind": "coupled L2: g ← g + λ·w", "lambda": lam, **tuned, **norms}
    coupling = options.get("lr_coupling", "lr")
    c = transforms.multiplier(coupling, lr, options.get("max_learning_rate") or args.lr)
    first, last = (float(c(jnp.asarray(t))) * lam for t in (0, total_steps - 1))
    return {
        "kind": "decoupled: u ← u − c_t·λ·w",
        "lambda": lam,
        **tuned,
        "lr_coupling": coupling,
        "per_step_factor_first": first,
        "per_step_factor_last": last,
        **norms,
    }


def cmd_train(args: argparse.Namespace) -> int:
    out, lock = _out_dir(args.out)
    try:
        return _train(args, out)
    finally:
        if lock is not None:
            lock.release()


def _saved(ckpt_dir: str | pathlib.Path) -> bool:
    """Whether `ckpt_dir` (a local path; a URL is asked to orbax) holds checkpoints."""
    if "://" in str(ckpt_dir):
        import orbax.checkpoint as ocp

        return bool(ocp.CheckpointManager(ckpt_dir).all_steps())
    ckpt_dir = pathlib.Path(ckpt_dir)
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def _train(args: argparse.Namespace, out: pathlib.Path) -> int:
    ckpt_dir = args.checkpoint_dir or out / "checkpoints"
    saved = _saved(ckpt_dir)
    if saved and not args.resume:
        raise UsageError(
            f"{ckpt_dir} already holds checkpoints: pass --resume, or choose another --out"
        )
    if args.resume and not args.checkpoint_every:
        raise UsageError("--resume needs --checkpoint-every (the interval the run was saved with)")
    if args.resume and not saved:
        raise UsageError(f"--resume: {ckpt_dir} holds no checkpoint to resume from")
    config_file = out / "config.json"
    changes: dict[str, float] = {}
    if args.resume:
        if config_file.exists():
            stored = json.loads(config_file.read_text())
        else:  # a resume elsewhere (another slice): the checkpoint holds the config too
            with checkpoint.Checkpointer(ckpt_dir, args.checkpoint_every) as found:
                stored = found.stored_config()
        changes = _resume_changes(args, stored)
    layout = _layout(args)
    if _writer():
        report.write_json(_run_config(args), config_file)
    ds = _dataset(args, args.seed)
    model = _model(args, ds)
    mask = parse_mask(args.mask)
    batch_size = min(args.batch_size, len(ds.x_train))
    steps = len(ds.x_train) // batch_size
    lr = _schedule(args, steps)
    options = _optimizer_options(args, mask)
    auto = args.weight_decay == "auto"
    lam = args.auto_decay_init if auto else args.weight_decay
    opt = optimizers.create(args.optimizer, lr, lam, l1=args.l1, **options)
    if args.clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(args.clip_norm), opt)
    tuner = None
    if auto:
        tuner = Tuner(opt, learning_rate=args.auto_decay_lr, horizon=args.auto_decay_horizon)
    loss_terms = _penalties(args, mask)
    params, _ = jax.eval_shape(model.init, jax.random.PRNGKey(0))  # shapes: nothing runs
    table = masks.describe(params, mask, file=None)  # validates the mask before training

    ckpt = None
    if args.checkpoint_every:
        ckpt = checkpoint.Checkpointer(ckpt_dir, args.checkpoint_every, config=_run_config(args))
    where = "" if layout is None else f"; {layout.describe()}"
    if _writer():
        print(
            f"{ds.summary()}; {args.model} with {table.total:,} parameters, "
            f"{table.decayed:,} decayed{where}"
        )
    try:
        result = train.fit(
            model, opt, ds, epochs=args.epochs, batch_size=batch_size, seed=args.seed,
            penalties=loss_terms, mask=mask, patience=args.patience, checkpoints=ckpt,
            progress=not args.no_progress, hyperparams=changes or None, layout=layout,
            tuner=tuner,
        )  # fmt: skip
    finally:
        if ckpt is not None:
            ckpt.close()
    if not _writer():
        return 0
    state = result.state
    splits = {
        name: train.evaluate(model, state.params, state.model_state, ds.arrays(name))
        for name in ("train", "val", "test")
    }
    in_loss = {p.name: float(p(state.params)) for p in loss_terms}
    decay = _decay_report(args, options, lr, args.epochs * steps, result.history[-1])
    summary = {
        "config": {k: v for k, v in vars(args).items() if k != "run"},
        "dataset": ds.summary(),
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "diverged": result.diverged,
        "skipped_steps": int(state.skipped),
        "hyperparams_set_on_resume": changes,
        "results": splits,
        "penalties_in_loss": in_loss,
        "decay": decay,
        "parameters": {"total": table.total, "decayed": table.decayed},
        "layout": where.removeprefix("; ") or "one device",
        "processes": jax.process_count(),
    }
    report.write_json(summary, out / "summary.json")
    report.write_jsonl(result.history, out / "metrics.jsonl")
    print(_results_table(splits, in_loss, decay, table))
    if int(state.skipped):
        print(
            f"wdjax: warning: {int(state.skipped)} step(s) were skipped (non-finite loss, "
            "gradients or update, or a bad scheduled hyperparameter)",
            file=sys.stderr,
        )
    if result.diverged:
        print(
            "the run diverged: the last epoch's loss was not finite; the state above is the "
            f"last finite one ({int(state.skipped)} steps skipped)"
        )
    _plot(report.plot_history, result.history, out / "curves.png")
    print(f"wrote {out / 'metrics.jsonl'}, {out / 'summary.json'}, {out / 'curves.png'}")
    return 0


def _plot(draw: Any, what: Any, path: pathlib.Path) -> None:
    """Draw a figure after the results are written: a failure here loses nothing."""
    try:
        draw(what, path)
    except Exception as e:  # noqa: BLE001 - the results are safe; say why there is no figure
        print(f"wdjax: warning: could not draw {path} ({type(e).__name__}: {e})", file=sys.stderr)


def _results_table(splits: dict, in_loss: dict, decay: dict, table: Any) -> str:
    lines = [f"{'split':<6} {'accuracy':>9} {'loss':>9}"]
    lines += [f"{k:<6} {v['accuracy']:>9.4f} {v['loss']:>9.4f}" for k, v in splits.items()]
    lines += [f"penalty in the loss {k}: {v:.6g}" for k, v in in_loss.items()]
    if "per_step_factor_first" in decay:
        lines.append(
            f"weight decay ({decay['kind']}): λ = {decay['lambda']:g}, coupling "
            f"{decay['lr_coupling']}, per-step factor c·λ = {decay['per_step_factor_first']:.3g}"
            f" (first step) … {decay['per_step_factor_last']:.3g} (last)"
        )
    else:
        lines.append(f"weight decay ({decay['kind']}): λ = {decay['lambda']:g}")
    lines.append(
        f"weight norm: decayed {decay['weight_norm_decayed']:.4g}, "
        f"other {decay['weight_norm_other']:.4g}"
    )
    lines.append(f"decayed parameters: {table.decayed:,} of {table.total:,}")
    return "\n".join(lines)


def _quiet_background_errors() -> None:
    """Orbax's writer threads log and print tracebacks of their own when a write fails
    (a full disk): the main thread reports the same failure in one line."""
    import logging
    import threading

    logging.disable(logging.CRITICAL)  # absl, orbax, asyncio: the CLI itself logs nothing
    threading.excepthook = lambda hook_args: None
    sys.unraisablehook = lambda hook_args: None  # orbax's abandoned read coroutines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI: every failure is one line `wdjax: error: ...` and exit status 2
    (`--debug`: the traceback instead)."""
    parser = build_parser()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    if not debug:
        _quiet_background_errors()
    try:
        args = parser.parse_args(argv)
        _compile_cache(args)
        _start_distributed(args)
        return args.run(args)
    except KeyboardInterrupt:
        print("wdjax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's contract: one line, exit 2
        if debug:
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"wdjax: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
