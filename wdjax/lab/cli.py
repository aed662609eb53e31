"""The ``wdjax`` command: ``train``, ``sweep`` and ``masks``.

Bad input prints one line, ``wdjax: error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import jax
import optax

from wdjax import masks, optimizers
from wdjax.lab import checkpoint, data, models, train
from wdjax.penalties import l1 as l1_penalty
from wdjax.penalties import l2 as l2_penalty

SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear")
INPUT_SHAPES = {
    "digits": (8, 8, 1),
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "xor": (2,),
}


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog.removeprefix('wdjax').strip() or 'wdjax'}: {message}")


def parse_mask(words: Sequence[str]) -> Any:
    """``default`` | ``all`` | ``none`` | glob patterns -> a mask for :mod:`wdjax.masks`."""
    named = {"default": masks.default(), "all": masks.ALL, "none": masks.NONE}
    if len(words) == 1 and words[0] in named:
        return named[words[0]]
    if any(w in named for w in words):
        raise UsageError(f"--mask takes one of {', '.join(named)} alone, or glob patterns")
    return masks.match(*words)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value >= 0:  # also rejects NaN
            raise argparse.ArgumentTypeError(f"expected a value >= 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _list_of(kind: type) -> Any:
    item = _positive(kind) if kind is float else kind

    def parse(text: str) -> list:
        try:
            return [item(t) for t in text.split(",") if t.strip()] or _empty(text)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__}s: {e}"
            ) from None

    return parse


def _empty(text: str) -> NoReturn:
    raise ValueError(f"empty list {text!r}")


_floats, _ints = _list_of(float), _list_of(int)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=models.MODELS, default="mlp")
    p.add_argument("--widths", default="256,256", help="MLP hidden widths, comma-separated")
    p.add_argument("--dropout", type=_positive(float), default=0.0)
    p.add_argument("--batch-norm", action="store_true")


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=data.DATASETS, default="digits")
    p.add_argument(
        "--data-dir", help="directory with MNIST / Fashion-MNIST files (default: $WDJAX_DATA)"
    )
    p.add_argument(
        "--download", action="store_true", help="download the dataset (checksums verified)"
    )


def _optim_options(p: argparse.ArgumentParser, single: bool = True) -> None:
    p.add_argument("--optimizer", choices=tuple(optimizers.OPTIMIZERS), default="adamw")
    if single:
        p.add_argument("--lr", type=_positive(float), default=1e-3)
        p.add_argument("--weight-decay", type=_positive(float), default=1e-4)
        p.add_argument("--l1", type=_positive(float), default=None, help="proximal L1 rate")
    p.add_argument("--momentum", type=_positive(float), default=0.9, help="for sgdw / sgd_l2")
    p.add_argument(
        "--mask", nargs="+", default=["default"], help="default | all | none | glob patterns"
    )
    p.add_argument("--epochs", type=_positive(int), default=30)
    p.add_argument("--batch-size", type=_positive(int), default=64)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wdjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a reference model")
    _model_options(t)
    _data_options(t)
    _optim_options(t)
    t.add_argument("--schedule", choices=SCHEDULES, default="constant")
    t.add_argument("--warmup-epochs", type=_positive(int), default=1)
    t.add_argument("--clip-norm", type=_positive(float), default=None)
    t.add_argument(
        "--patience", type=_positive(int), default=None, help="early stopping on val loss"
    )
    t.add_argument("--out", default="runs/train", help="output directory")
    t.add_argument("--checkpoint-every", type=_positive(int), default=None, help="steps")
    t.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(run=cmd_train)

    s = sub.add_parser("sweep", help="train a grid of λ (× lr × l1 × seeds × folds) at once")
    _model_options(s)
    _data_options(s)
    _optim_options(s, single=False)
    s.add_argument(
        "--weight-decay",
        type=_floats,
        default=[0.0, 1e-5, 1e-4, 1e-3, 1e-2],
        help="comma-separated",
    )
    s.add_argument("--lr", type=_floats, default=[1e-3], help="comma-separated")
    s.add_argument("--l1", type=_floats, default=None, help="comma-separated proximal L1 rates")
    s.add_argument("--seeds", type=_ints, default=[0], help="comma-separated")
    s.add_argument("--folds", type=_positive(int), default=None, help="k-fold cross-validation")
    s.add_argument("--select", choices=("best", "one_se"), default="best")
    s.add_argument("--metric", choices=("accuracy", "loss"), default="accuracy")
    s.add_argument(
        "--chunk-size", type=_positive(int), default=None, help="members per compiled chunk"
    )
    s.add_argument("--out", default="runs/sweep", help="output directory")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(run=cmd_sweep, epochs=15)

    m = sub.add_parser("masks", help="print which parameters a mask decays")
    _model_options(m)
    m.add_argument(
        "--dataset", choices=data.DATASETS, default="digits", help="sets the input shape"
    )
    m.add_argument("--mask", nargs="+", default=["default"])
    m.set_defaults(run=cmd_masks)
    return parser


def cmd_sweep(args: argparse.Namespace) -> int:
    from wdjax.lab.sweeps import sweep

    ds = data.load(args.dataset, data_dir=args.data_dir, seed=args.seed, download=args.download)
    model = _model(args, ds.input_shape, ds.num_classes)
    config: dict[str, Any] = {"mask": parse_mask(args.mask)}
    if args.optimizer in ("sgdw", "sgd_l2"):
        config["momentum"] = args.momentum
    result = sweep(
        ds,
        model=model,
        optimizer=args.optimizer,
        optimizer_config=config,
        weight_decay=args.weight_decay,
        learning_rate=args.lr,
        l1=args.l1,
        seeds=args.seeds,
        folds=args.folds,
        fold_seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        select=args.select,
        metric=args.metric,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / "sweep.json")
    result.plot(out / "sweep.png")
    print(result.table())
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.png'}")
    return 0


def _model(
    args: argparse.Namespace, input_shape: tuple[int, ...], num_classes: int
) -> models.Model:
    config: dict[str, Any] = {"dropout": args.dropout, "batch_norm": args.batch_norm}
    if args.model == "mlp":
        try:
            config["widths"] = tuple(int(w) for w in args.widths.split(","))
        except ValueError:
            raise UsageError(
                f"--widths takes comma-separated integers, got {args.widths!r}"
            ) from None
    return models.create(args.model, input_shape=input_shape, num_classes=num_classes, **config)


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


def _optimizer(
    args: argparse.Namespace, mask: Any, learning_rate: Any
) -> optax.GradientTransformation:
    kwargs: dict[str, Any] = {"mask": mask, "l1": args.l1}
    if args.optimizer in ("sgdw", "sgd_l2"):
        kwargs["momentum"] = args.momentum
    opt = optimizers.create(args.optimizer, learning_rate, args.weight_decay, **kwargs)
    return optax.chain(optax.clip_by_global_norm(args.clip_norm), opt) if args.clip_norm else opt


def cmd_masks(args: argparse.Namespace) -> int:
    model = _model(args, INPUT_SHAPES[args.dataset], 10)
    params, _ = model.init(jax.random.PRNGKey(0))
    print(
        f"{args.model} on {args.dataset} {INPUT_SHAPES[args.dataset]}, mask: {' '.join(args.mask)}"
    )
    masks.describe(params, parse_mask(args.mask))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not args.resume:
        raise UsageError(
            f"{ckpt_dir} already holds checkpoints: pass --resume, or choose another --out"
        )
    if args.resume and not args.checkpoint_every:
        raise UsageError("--resume needs --checkpoint-every (the interval the run was saved with)")
    ds = data.load(args.dataset, data_dir=args.data_dir, seed=args.seed, download=args.download)
    model = _model(args, ds.input_shape, ds.num_classes)
    mask = parse_mask(args.mask)
    batch_size = min(args.batch_size, len(ds.x_train))
    if batch_size < 1 or args.epochs < 1:
        raise UsageError("--epochs and --batch-size must be at least 1")
    lr = _schedule(args, len(ds.x_train) // batch_size)
    opt = _optimizer(args, mask, lr)
    params, _ = model.init(jax.random.PRNGKey(0))
    table = masks.describe(params, mask, file=None)  # validates the mask before training

    out.mkdir(parents=True, exist_ok=True)
    ckpt = (
        checkpoint.Checkpointer(ckpt_dir, args.checkpoint_every) if args.checkpoint_every else None
    )
    print(
        f"{ds.summary()}; {args.model} with {table.total:,} parameters, {table.decayed:,} decayed"
    )
    result = train.fit(
        model,
        opt,
        ds,
        epochs=args.epochs,
        batch_size=batch_size,
        seed=args.seed,
        mask=mask,
        patience=args.patience,
        checkpoints=ckpt,
        progress=not args.no_progress,
    )
    if ckpt is not None:
        ckpt.close()
    state = result.state
    splits = {
        name: train.evaluate(model, state.params, state.model_state, x, y)
        for name, x, y in (
            ("train", ds.x_train, ds.y_train),
            ("val", ds.x_val, ds.y_val),
            ("test", ds.x_test, ds.y_test),
        )
    }
    penalties = {"l2 (λ/2·Σw²)": float(l2_penalty(args.weight_decay, mask)(state.params))}
    if args.l1 is not None:
        penalties["l1 (λ·Σ|w|)"] = float(l1_penalty(args.l1, mask)(state.params))
    summary = {
        "config": {k: v for k, v in vars(args).items() if k != "run"},
        "dataset": ds.summary(),
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "skipped_steps": int(state.skipped),
        "results": splits,
        "penalties": penalties,
        "parameters": {"total": table.total, "decayed": table.decayed},
    }
    _write_outputs(out, result.history, summary)
    print(_results_table(splits, penalties, table))
    print(f"wrote {out / 'metrics.jsonl'}, {out / 'summary.json'}, {out / 'curves.png'}")
    return 0


def _results_table(splits: dict, penalties: dict, table: masks.Table) -> str:
    lines = [f"{'split':<6} {'accuracy':>9} {'loss':>9}"]
    lines += [f"{k:<6} {v['accuracy']:>9.4f} {v['loss']:>9.4f}" for k, v in splits.items()]
    lines += [f"{k}: {v:.6g}" for k, v in penalties.items()]
    lines.append(f"decayed parameters: {table.decayed:,} of {table.total:,}")
    return "\n".join(lines)


def _write_outputs(out: pathlib.Path, history: list[dict], summary: dict) -> None:
    with open(out / "metrics.jsonl", "w") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plot_history(history, out / "curves.png")


def plot_history(history: list[dict], path: pathlib.Path) -> None:
    """Loss, accuracy and weight-norm curves per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (
        ("loss", (("loss", "train"), ("val_loss", "val"))),
        ("accuracy", (("accuracy", "train"), ("val_accuracy", "val"))),
        ("weight norm", (("weight_norm_decayed", "decayed"), ("weight_norm_other", "not decayed"))),
    )
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            ax.plot(epochs, [r[key] for r in history], label=label)
        ax.set(title=title, xlabel="epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except (UsageError, ValueError, ImportError, FileNotFoundError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"wdjax: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
