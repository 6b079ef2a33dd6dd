"""The ``jitgrad`` command.

Each subcommand is one function that adds its parser and sets ``run`` (see
``_add_train``); list it in ``SUBCOMMANDS`` and it is wired in. A subcommand's
``run(args)`` returns the exit code; errors caused by bad input are raised as
``ValueError`` / ``OSError`` / ``MemoryError`` (``jg.JitgradError`` is a
``ValueError``) and reported by :func:`main` as one line on stderr with exit code 2;
argparse types (``output_path``, ``positive_int``, ...) refuse bad flags before any
work starts.

``jitgrad train`` trains an MLP (by default on the bundled 8x8 digits) with one
compiled program per step: forward, backward and optimizer update.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import numpy as np

from . import checkpoint_io, nn, random
from . import optim as optim_mod
from .api import jit
from .data import Dataset, batches_per_epoch, load_dataset, minibatches
from .errors import JitgradError
from .train import TrainStep, train_step

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader left

# ------------------------------------------------------------------------------ config

# Per-optimizer defaults for the flags whose sensible value depends on the optimizer.
OPTIMIZER_DEFAULTS = {
    "sgd": {"lr": 0.05, "weight_decay": 2e-3},
    "adam": {"lr": 1e-3, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2},
}
SCHEDULES = ("constant", "step", "cosine")
DTYPES = ("float32", "float64")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` for lr / weight_decay means the
    optimizer's default (OPTIMIZER_DEFAULTS)."""

    data: str | None = None
    hidden: tuple[int, ...] = (512,)
    epochs: int = 40
    batch_size: int = 32
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None
    schedule: str = "cosine"
    dtype: str = "float32"
    seed: int = 0
    remat: str | None = None
    memory_budget: int | None = None
    eval_batch_size: int = 1024
    dropout: float = 0.0

    def resolved(self) -> TrainConfig:
        """A copy with optimizer-dependent defaults filled in and every field validated."""
        if self.optimizer not in OPTIMIZER_DEFAULTS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use one of "
                             f"{', '.join(OPTIMIZER_DEFAULTS)}")
        d = OPTIMIZER_DEFAULTS[self.optimizer]
        cfg = dataclasses.replace(
            self, hidden=tuple(int(h) for h in self.hidden),
            lr=d["lr"] if self.lr is None else float(self.lr),
            weight_decay=d["weight_decay"] if self.weight_decay is None
            else float(self.weight_decay))
        checks = [
            (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
            (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
            (cfg.eval_batch_size >= 1, "the evaluation batch size must be at least 1"),
            (math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
            (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
            (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
             f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
            (cfg.schedule in SCHEDULES, f"unknown schedule {cfg.schedule!r}"),
            (cfg.dtype in DTYPES, f"unknown dtype {cfg.dtype!r}"),
            (all(h >= 1 for h in cfg.hidden), f"hidden sizes must be positive, got {cfg.hidden}"),
            (cfg.memory_budget is None or cfg.memory_budget > 0,
             "--memory-budget must be positive"),
            (cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}"),
            (0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        from .remat import check_policy
        check_policy(cfg.remat, cfg.memory_budget)
        return cfg

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_json(cls, d: Any) -> TrainConfig:
        """The config ``to_json`` wrote; raises ValueError naming a field of the wrong type
        (a checkpoint's JSON is input like any other)."""
        if not isinstance(d, dict):
            raise ValueError(f"the config is a {type(d).__name__}, not a JSON object")
        hints = typing.get_type_hints(cls)
        kw = {k: v for k, v in d.items() if k in hints}
        for k, v in kw.items():
            if not _json_fits(v, hints[k]):
                want = hints[k].__name__ if isinstance(hints[k], type) else str(hints[k])
                raise ValueError(f"config field {k!r} is {v!r}, not of type {want}")
        if "hidden" in kw:
            kw["hidden"] = tuple(kw["hidden"])
        return cls(**kw)


def _json_fits(value: Any, hint: Any) -> bool:
    """Whether a value decoded from JSON fits a TrainConfig field's type hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_json_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:  # tuple[int, ...] arrives as a JSON list
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_json_fits(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def parse_hidden(text: str) -> tuple[int, ...]:
    """'128,64' -> (128, 64); '' or 'none' -> () (a linear model)."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths like 128,64, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {text!r}")
    return sizes


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def output_path(text: str) -> str:
    """An argparse type for a file jitgrad will write: refused at once (not after the
    training or the sweep) if it names a directory or a place no file can be created."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got an empty one")
    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file name")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory "
                                         f"{directory!r} does not exist")
    try:  # the only sure test: create a file there (permissions, read-only mounts, /proc)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".jitgrad-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: cannot create files in "
                                         f"directory {directory!r} ({e.strerror or e})"
                                         ) from None
    return text


def parse_bytes(text: str) -> int:
    """'1048576', '512KiB', '1.5MB', '2G' -> bytes, for argparse."""
    from .remat import parse_bytes as parse
    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def scale_default_lr(cfg: TrainConfig, n_ranks: int) -> TrainConfig:
    """Without an explicit --lr, scale the default learning rate to a global batch N
    times larger: linearly for SGD (Goyal et al. 2017, "Accurate, Large Minibatch SGD"),
    by sqrt(N) for Adam/AdamW, whose steps are already normalised per coordinate.

    On the bundled digits this keeps 2 ranks at the single-process accuracy (~98%),
    where the unscaled rate with half as many steps lost about half a point.
    """
    if n_ranks <= 1 or cfg.lr is not None or cfg.optimizer not in OPTIMIZER_DEFAULTS:
        return cfg
    factor = n_ranks if cfg.optimizer == "sgd" else math.sqrt(n_ranks)
    return dataclasses.replace(cfg, lr=OPTIMIZER_DEFAULTS[cfg.optimizer]["lr"] * factor)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optim_mod.Optimizer:
    """The optimizer (with its learning-rate schedule) that ``cfg`` describes."""
    if cfg.schedule == "cosine":
        schedule: optim_mod.Schedule = optim_mod.Cosine(total_steps)
    elif cfg.schedule == "step":
        # Divide the learning rate by 10 after each third of training.
        schedule = optim_mod.StepDecay(max(1, math.ceil(total_steps / 3)), gamma=0.1)
    else:
        schedule = optim_mod.Constant()
    assert cfg.lr is not None and cfg.weight_decay is not None
    if cfg.optimizer == "sgd":
        return optim_mod.SGD(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                             nesterov=cfg.nesterov and cfg.momentum > 0, schedule=schedule)
    cls = optim_mod.Adam if cfg.optimizer == "adam" else optim_mod.AdamW
    return cls(lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=schedule)


# ---------------------------------------------------------------------------- training


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite. ``saved_epoch``: the epoch the --save
    checkpoint holds (None if this run saved nothing)."""

    def __init__(self, epoch: int, step_in_epoch: int, global_step: int, loss: float,
                 saved_epoch: int | None = None):
        self.epoch, self.step_in_epoch, self.global_step, self.loss = (
            epoch, step_in_epoch, global_step, loss)
        self.saved_epoch = saved_epoch
        super().__init__(f"non-finite training loss ({loss}) at epoch {epoch}, step "
                         f"{step_in_epoch} (global step {global_step})")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; carries where it happened."""

    def __init__(self, epoch: int, step_in_epoch: int, saved_epoch: int | None = None):
        self.epoch, self.step_in_epoch, self.saved_epoch = epoch, step_in_epoch, saved_epoch
        where = f"step {step_in_epoch}" if step_in_epoch else "the end"
        super().__init__(f"interrupted at {where} of epoch {epoch}")


def check_dataset(ds: Dataset, batch_size: int) -> None:
    """Reject datasets the model cannot be trained or evaluated on, with a clear reason."""
    if len(ds.x_train) == 0 or len(ds.x_test) == 0:
        raise ValueError(f"{ds.name}: the train and test splits must both be non-empty "
                         f"(got {len(ds.x_train)} and {len(ds.x_test)} examples)")
    train_classes = int(ds.y_train.max()) + 1
    bad = np.flatnonzero(ds.y_test >= train_classes)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{ds.name}: test label {int(ds.y_test[i])} at index {i} is out of "
                         f"range: training labels are 0..{train_classes - 1}")
    if ds.n_classes < 2:
        raise ValueError(f"{ds.name}: need at least 2 classes, got {ds.n_classes}")
    if ds.n_classes > len(ds.x_train):
        # Labels number the classes 0..K-1 and the model has one output per class: a
        # label like 10**12 would otherwise ask for a terabyte-sized output layer.
        raise ValueError(f"{ds.name}: the largest label, {ds.n_classes - 1}, makes "
                         f"{ds.n_classes} classes, more than the {len(ds.x_train)} training "
                         f"examples: labels must number the classes 0, 1, 2, ...")
    if batch_size > len(ds.x_train):
        raise ValueError(f"--batch-size {batch_size} is larger than the training set "
                         f"({len(ds.x_train)} examples)")


def _mlp_loss(params: dict[str, Any], x: Any, y: Any) -> Any:
    return nn.mlp_loss(params, x, y)


def _mlp_logits(params: dict[str, Any], x: Any) -> Any:
    return nn.mlp_apply(params, x)


def evaluate(forward: Callable[..., Any], params: Any, x: np.ndarray, y: np.ndarray,
             batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``forward(params, x)`` logits over (x, y).

    Runs in batches of ``min(batch_size, len(x))`` rows; the last partial batch is
    zero-padded to the same size, so one compiled shape serves the whole set.
    """
    n = len(x)
    bs = min(batch_size, n)
    correct, loss_sum = 0, 0.0
    pad = None
    for start in range(0, n, bs):
        xb = x[start:start + bs]
        m = len(xb)
        if m < bs:
            if pad is None:
                pad = np.zeros((bs,) + x.shape[1:], x.dtype)
            pad[:m] = xb
            xb = pad
        logits = np.asarray(forward(params, xb), np.float64)[:m]
        yb = y[start:start + m]
        correct += int(np.sum(np.argmax(logits, axis=1) == yb))
        mx = logits.max(axis=1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1))
        loss_sum += float(np.sum(lse - logits[np.arange(m), yb]))
    return correct / n, loss_sum / n


@dataclasses.dataclass
class TrainResult:
    metrics: dict[str, Any]
    params: dict[str, np.ndarray]
    state: Any
    step: TrainStep


def _say(out: TextIO | None, bar: Any, line: str) -> None:
    if out is None:
        return
    if bar is not None:
        bar.write(line, file=out)
    else:
        print(line, file=out, flush=True)


def run_training(cfg: TrainConfig, *, resume: str | os.PathLike[str] | None = None,
                 save: str | os.PathLike[str] | None = None, out: TextIO | None = sys.stdout,
                 progress: bool = False,
                 on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
                 resume_data: tuple[Any, Any, dict[str, Any]] | None = None,
                 comm: Any = None) -> TrainResult:
    """Train an MLP as ``cfg`` says; print per-epoch lines to ``out`` (None: silent).

    With an MPI communicator ``comm``, training is data-parallel over its ranks
    (jitgrad.distributed): ``cfg.batch_size`` is per rank, each rank reads its own
    shard of every global batch, the test set is evaluated in shards and the
    metrics reduced, and only rank 0 writes ``save``. Every rank returns the same
    metrics and parameters.

    With ``save``, a checkpoint is written atomically after every epoch, so an
    interrupted run can be resumed from its last complete epoch and end exactly
    where an uninterrupted run would. Raises TrainingDiverged on a non-finite loss
    (nothing is saved for that epoch) and TrainingInterrupted on Ctrl-C.
    """
    wall0 = time.perf_counter()
    n_ranks = 1 if comm is None else comm.Get_size()
    cfg = scale_default_lr(cfg, n_ranks).resolved()
    if resume is not None and resume_data is None:
        resume_data = checkpoint_io.load(resume)
    start_epoch = 0
    source = "the checkpoint" if resume is None else f"checkpoint {str(resume)!r}"
    if resume_data is not None:
        start_epoch, _ = _resume_position(resume_data[2], source)

    rank = 0 if comm is None else comm.Get_rank()
    global_batch = cfg.batch_size * n_ranks
    dtype = np.dtype(cfg.dtype)
    ds = load_dataset(cfg.data, dtype)  # fixed split (seed 0): comparable accuracy figures
    check_dataset(ds, global_batch)
    steps_per_epoch = batches_per_epoch(len(ds.x_train), global_batch)
    total_steps = steps_per_epoch * cfg.epochs

    sizes = [ds.n_features, *cfg.hidden, ds.n_classes]
    params = nn.mlp_init(sizes, np.random.default_rng(cfg.seed), dtype)
    opt = make_optimizer(cfg, total_steps)
    jit_options: dict[str, Any] = {}
    if cfg.remat is not None:
        jit_options["remat"] = cfg.remat
    if cfg.memory_budget is not None:
        jit_options["memory_budget"] = cfg.memory_budget
    if comm is not None:
        jit_options["comm"] = comm
    loss_fn: Callable[..., Any] = _mlp_loss
    if cfg.dropout:  # a key per step (fold_in(key, t)): saved, so a resume is exact
        loss_fn = functools.partial(nn.mlp_loss, dropout_rate=cfg.dropout)
        jit_options["key"] = random.key(cfg.seed)
    step = train_step(loss_fn, params, opt, **jit_options)
    if resume_data is not None:
        checkpoint_io.restore_into(step.params, step.state, resume_data[0], resume_data[1],
                                   source)
        checkpoint_io.restore_step(step, resume_data[2], source)
        if comm is not None:
            step.broadcast()  # every rank continues from rank 0's copy
    forward = jit(_mlp_logits)

    def evaluate_test() -> tuple[float, float]:
        if comm is None or n_ranks == 1:
            return evaluate(forward, step.params, ds.x_test, ds.y_test, cfg.eval_batch_size)
        # Each rank scores its share of the test set; the sums are reduced.
        from .distributed import allreduce_sum, shard_range
        lo, hi = shard_range(len(ds.x_test), comm)
        acc, loss = (evaluate(forward, step.params, ds.x_test[lo:hi], ds.y_test[lo:hi],
                              cfg.eval_batch_size) if hi > lo else (0.0, 0.0))
        correct, loss_sum = allreduce_sum(comm, [acc * (hi - lo), loss * (hi - lo)])
        return float(correct) / len(ds.x_test), float(loss_sum) / len(ds.x_test)

    def checkpoint_meta(epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, **checkpoint_io.step_meta(step), "config": cfg.to_json(),
                "dataset": ds.name, "sizes": sizes}

    compile_time: float | None = None
    step_times: list[float] = []
    train_loss = float("nan")
    history: list[dict[str, Any]] = []
    epoch, k = start_epoch, 0
    saved_epoch: int | None = None
    bar = None
    if out is not None and n_ranks > 1:
        from .threads import num_threads
        _say(out, None, f"distributed: {n_ranks} ranks x batch {cfg.batch_size} = global batch "
                        f"{global_batch}; learning rate {cfg.lr:g}; {num_threads()} "
                        f"thread(s) per rank")
    if out is not None and start_epoch >= cfg.epochs:
        _say(out, None, f"checkpoint is at epoch {start_epoch}, already >= --epochs "
                        f"{cfg.epochs}: evaluating only")
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            # The shuffle depends only on (seed, epoch), so a resumed run sees the same batches.
            # In a distributed run every rank draws the same permutation and takes its slice.
            batches = minibatches(ds.x_train, ds.y_train, cfg.batch_size,
                                  np.random.default_rng([cfg.seed, epoch]),
                                  rank=rank, num_ranks=n_ranks)
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)
            loss_sum, last_postfix, last_k = 0.0, t_epoch, 0
            for k, (xb, yb) in enumerate(batches, start=1):
                t0 = time.perf_counter()
                loss = float(step(xb, yb))
                dt = time.perf_counter() - t0
                if compile_time is None:
                    compile_time = dt
                    last_postfix, last_k = time.perf_counter(), k  # rate excludes compiling
                else:
                    step_times.append(dt)
                if not math.isfinite(loss):
                    raise TrainingDiverged(epoch + 1, k, step.t, loss, saved_epoch)
                loss_sum += loss
                if bar is not None:
                    bar.update(1)
                    now = time.perf_counter()
                    if now - last_postfix > 0.2:  # examples/s over the last ~0.2 s
                        rate = (k - last_k) * global_batch / (now - last_postfix)
                        last_postfix, last_k = now, k
                        bar.set_postfix_str(f"loss={loss:.4f}, {rate:,.0f} ex/s", refresh=False)
            k = 0
            if bar is not None:
                bar.close()
                bar = None
            train_loss = loss_sum / steps_per_epoch
            acc, test_loss = evaluate_test()
            seconds = time.perf_counter() - t_epoch
            record = {"epoch": epoch + 1, "train_loss": train_loss, "test_loss": test_loss,
                      "test_accuracy": acc, "time_s": seconds}
            history.append(record)
            _say(out, None, f"epoch {epoch + 1:>{len(str(cfg.epochs))}}/{cfg.epochs}  "
                            f"train loss {train_loss:.4f}  test loss {test_loss:.4f}  "
                            f"test acc {100 * acc:6.2f}%  {seconds:6.2f}s")
            if save is not None:
                if rank == 0:  # the ranks hold identical parameters: one writer
                    checkpoint_io.save(save, step.params, step.state, checkpoint_meta(epoch + 1))
                saved_epoch = epoch + 1
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
    except KeyboardInterrupt:
        raise TrainingInterrupted(epoch + 1, k, saved_epoch) from None
    finally:
        if bar is not None:
            bar.close()

    if history:
        acc, test_loss = history[-1]["test_accuracy"], history[-1]["test_loss"]
    else:  # resumed at or past the last epoch: just evaluate
        acc, test_loss = evaluate_test()
    plan = None
    try:
        plan = step.compiled.plan
    except JitgradError:
        pass  # nothing was compiled (no steps run)
    step_time = float(np.median(step_times)) if step_times else compile_time
    metrics = {
        "test_accuracy": acc,
        "test_loss": test_loss,
        "train_loss": train_loss,
        "epochs": cfg.epochs,
        "epochs_run": len(history),
        "steps": step.t,
        "step_time_s": step_time,
        "compile_time_s": compile_time,
        "planned_peak_bytes": getattr(plan, "peak_bytes", None),
        "examples_per_s": global_batch / step_time if step_time else None,
        "ranks": n_ranks,
        "global_batch_size": global_batch,
        "allreduce_share": getattr(step, "allreduce_share", None),
        "wall_time_s": time.perf_counter() - wall0,
        "dataset": ds.name,
        "n_train": len(ds.x_train),
        "n_test": len(ds.x_test),
        "sizes": sizes,
        "config": cfg.to_json(),
    }
    return TrainResult(metrics, step.params, step.state, step)


def _resume_position(meta: dict[str, Any], source: str) -> tuple[int, int]:
    """(epoch, step) a `jitgrad train` checkpoint was saved at, checked."""
    epoch, step = meta.get("epoch"), meta.get("step")
    for name, v in (("epoch", epoch), ("step", step)):
        # a step count must also survive the float it becomes in the optimizer's update
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 2**53:
            raise checkpoint_io.CheckpointError(
                f"{source} was not written by `jitgrad train`: its metadata has "
                f"{name}={v!r}, not a non-negative integer")
    return epoch, step


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary_lines(m: dict[str, Any]) -> list[str]:
    step_ms = "n/a" if m["step_time_s"] is None else f"{1e3 * m['step_time_s']:.3f} ms"
    compile_s = "n/a" if m["compile_time_s"] is None else f"{m['compile_time_s']:.2f} s"
    rate = "" if not m["examples_per_s"] else f" ({m['examples_per_s']:,.0f} examples/s)"
    correct = round(m["test_accuracy"] * m["n_test"])
    extra = []
    if m.get("ranks", 1) > 1:
        share = m.get("allreduce_share")
        extra.append(f"distributed: {m['ranks']} ranks, global batch {m['global_batch_size']}"
                     + ("" if share is None else f", allreduce {100 * share:.1f}% of step time"))
    return extra + [
        f"test accuracy {100 * m['test_accuracy']:.2f}% ({correct}/{m['n_test']})  "
        f"test loss {m['test_loss']:.4f}  train loss {m['train_loss']:.4f}",
        f"step time {step_ms}{rate}  compile time {compile_s} (first step)  "
        f"planned memory {_fmt_bytes(m['planned_peak_bytes'])}  "
        f"wall time {m['wall_time_s']:.2f} s",
    ]


def _config_from_args(args: argparse.Namespace, saved: dict[str, Any] | None) -> TrainConfig:
    """Defaults, overridden by the resumed checkpoint's config, overridden by explicit flags."""
    base = TrainConfig.from_json(saved) if saved else TrainConfig()
    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **explicit)


def cmd_train(args: argparse.Namespace) -> int:
    if not args.distributed:
        return _train(args, None)
    from . import distributed
    comm = distributed.world()
    distributed.set_default_threads(comm)  # before anything compiles
    # An error on one rank must end the job, or the others wait in a collective forever.
    with distributed.abort_on_error(comm):
        return _train(args, comm)


def _train(args: argparse.Namespace, comm: Any) -> int:
    rank = 0 if comm is None else comm.Get_rank()
    resume_data = None
    saved_cfg = None
    if args.resume is not None:
        # In a distributed run rank 0 reads the checkpoint and sends it: no shared disk needed.
        resume_data = checkpoint_io.load(args.resume) if rank == 0 else None
        if comm is not None:
            resume_data = comm.bcast(resume_data, root=0)
        saved_cfg = resume_data[2].get("config")
        try:  # a checkpoint jitgrad train wrote holds a complete, valid config
            TrainConfig.from_json({} if saved_cfg is None else saved_cfg).resolved()
        except ValueError as e:
            raise checkpoint_io.CheckpointError(
                f"checkpoint {args.resume!r} holds an invalid training config: {e}") from None
    cfg = _config_from_args(args, saved_cfg)
    out = None if args.quiet or rank != 0 else sys.stdout
    progress = not args.quiet and rank == 0 and sys.stderr.isatty()
    try:
        result = run_training(cfg, resume=args.resume, resume_data=resume_data, save=args.save,
                              out=out, progress=progress, comm=comm)
    except TrainingDiverged as e:
        # The loss is reduced over the ranks, so they all diverge at the same step.
        if rank != 0:
            return EXIT_DIVERGED
        where = (f"{args.save} holds epoch {e.saved_epoch}" if e.saved_epoch
                 else "nothing was saved")
        print(f"jitgrad train: error: {e}; stopping ({where}). Try a smaller --lr.",
              file=sys.stderr)
        return EXIT_DIVERGED
    except TrainingInterrupted as e:
        if rank != 0:  # mpiexec interrupts every rank: one report
            return EXIT_INTERRUPTED
        where = (f"; {args.save} holds epoch {e.saved_epoch}, continue with "
                 f"--resume {args.save}" if e.saved_epoch else "; nothing was saved")
        print(f"\njitgrad train: {e}{where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    m = result.metrics
    if rank != 0:  # every rank holds the same metrics: rank 0 reports them
        return EXIT_OK
    for line in summary_lines(m):
        print(line)
    if args.save:
        print(f"saved {args.save}")
    if args.json:
        keys = ("test_accuracy", "test_loss", "train_loss", "epochs", "steps", "step_time_s",
                "compile_time_s", "planned_peak_bytes", "examples_per_s", "wall_time_s",
                "dataset", "n_train", "n_test", "sizes", "ranks", "global_batch_size",
                "allreduce_share")
        print(json.dumps({k: m[k] for k in keys} | {"config": m["config"]}))
    return EXIT_OK


def _add_train(sub: Any) -> None:
    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train an MLP (default: the bundled 8x8 digits)",
        description="Train an MLP classifier with a compiled forward+backward+update step. "
                    "Defaults reach about 98% test accuracy on the bundled digits in a few "
                    "seconds. With --resume, settings not given on the command line come "
                    "from the checkpoint.")
    # Defaults are None so that --resume can tell explicit flags from defaults; the
    # effective defaults (TrainConfig) are shown in the help text.
    a = p.add_argument
    a("--data", metavar="PATH", help="directory of MNIST-style IDX files, or a .npz/.csv "
      "file (default: bundled digits)")
    a("--hidden", type=parse_hidden, metavar="W1,W2,...",
      help=f"hidden layer widths (default: {','.join(map(str, d.hidden))})")
    a("--epochs", type=int, metavar="N", help=f"total epochs (default: {d.epochs})")
    a("--batch-size", type=int, metavar="N", help=f"default: {d.batch_size}")
    a("--lr", type=float, help="learning rate (default: " + ", ".join(
        f"{k} {v['lr']}" for k, v in OPTIMIZER_DEFAULTS.items()) + ")")
    a("--optimizer", choices=list(OPTIMIZER_DEFAULTS), help=f"default: {d.optimizer}")
    a("--momentum", type=float, help=f"SGD momentum (default: {d.momentum})")
    a("--nesterov", action=argparse.BooleanOptionalAction,
      help="Nesterov momentum for SGD (default: on)")
    a("--weight-decay", type=float, help="default: " + ", ".join(
        f"{k} {v['weight_decay']}" for k, v in OPTIMIZER_DEFAULTS.items()))
    a("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default: {d.schedule}; "
      "step divides the rate by 10 after each third of training)")
    a("--dtype", choices=DTYPES, help=f"default: {d.dtype}")
    a("--remat", nargs="?", const="sqrt", metavar="POLICY",
      help="recompute activations in the backward pass instead of storing them "
           "(policy, default sqrt)")
    a("--memory-budget", type=parse_bytes, metavar="BYTES",
      help="planned memory budget for the step, e.g. 4MiB")
    a("--seed", type=int, help=f"initialisation, shuffling and dropout seed (default: {d.seed})")
    a("--dropout", type=float, metavar="RATE",
      help=f"dropout rate after each hidden layer, in training only (default: {d.dropout})")
    a("--save", type=output_path, metavar="PATH",
      help="write params and optimizer state to this .npz after every epoch (atomically)")
    a("--resume", metavar="PATH", help="continue from a checkpoint written by --save")
    a("--distributed", action="store_true",
      help="data-parallel training over the ranks of an MPI job (run under mpiexec -n N; "
           "needs the mpi extra). --batch-size is per rank; without --lr the default rate is "
           "scaled to the N-times larger global batch (SGD: x N, Adam: x sqrt N); threads per "
           "rank default to cores / ranks on the machine")
    a("--json", action="store_true",
      help="print the final metrics as one JSON object on the last line")
    a("--quiet", "-q", action="store_true", help="no progress bar and no per-epoch lines")
    p.set_defaults(run=cmd_train)


def cmd_memsweep(args: argparse.Namespace) -> int:
    from . import memsweep
    model = memsweep.Model(args.depth, args.width, args.batch, args.dtype)
    for name in ("depth", "width", "batch", "rounds", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    named = [p for p in args.policies.split(",") if p]
    for p in named:  # before any planning: a typo costs nothing
        if p not in memsweep.POLICIES:
            raise ValueError(f"unknown policy {p!r}: use none, sqrt, full (and --budgets)")
    budgets = args.budgets if args.budgets is not None else memsweep.default_budgets(
        model, [0.25, 0.5, 0.75])
    policies = named + [str(b) for b in budgets]
    act = model.activation_bytes
    title = (f"{model.depth}-layer ReLU MLP, width {model.width}, batch {model.batch}, "
             f"{model.dtype} (one activation {act / 2**20:.1f} MiB)")
    print(title)
    rows = memsweep.table_rows(memsweep.sweep(model, policies, args.rounds, args.steps,
                                              log=None if args.quiet else sys.stderr))
    print(memsweep.format_table(rows))
    if args.csv:
        memsweep.write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        memsweep.plot_frontier(rows, args.plot, title)
        print(f"wrote {args.plot}")
    if args.timeline:
        from .timeline import plot_timeline
        names = {p: p if not p.isdigit() else f"budget {int(p) / 2**20:.0f} MiB"
                 for p in policies}
        plans = {}
        for p in policies:
            try:
                plans[names[p]] = memsweep.planned(model, p)
            except JitgradError:
                pass  # an infeasible budget has no plan; its table row says why
        plot_timeline(plans, args.timeline, title=title)
        print(f"wrote {args.timeline}")
    return EXIT_OK


def _parse_budgets(text: str) -> list[int]:
    return [parse_bytes(t) for t in text.split(",") if t.strip()]


def _add_memsweep(sub: Any) -> None:
    p = sub.add_parser(
        "memsweep", help="memory vs runtime of a training step under recomputation policies",
        description="Compile a deep ReLU MLP training step under each recomputation policy "
                    "(none, sqrt, byte budgets), each in its own process, alternating over "
                    "rounds, and print planned peak, measured peak, step time and "
                    "recomputation per policy.")
    a = p.add_argument
    a("--depth", type=int, default=32, help="layers (default: 32)")
    a("--width", type=int, default=256, help="layer width (default: 256)")
    a("--batch", type=int, default=1024, help="batch size (default: 1024)")
    a("--dtype", choices=DTYPES, default="float32")
    a("--policies", default="none,sqrt",
      help="comma-separated: none, sqrt, full (default: none,sqrt)")
    a("--budgets", type=_parse_budgets, metavar="B1,B2,...",
      help="memory budgets, e.g. 40MiB,60MiB (default: three between the sqrt and none plans)")
    a("--rounds", type=int, default=3, help="measured rounds per policy (default: 3)")
    a("--steps", type=int, default=5, help="timed steps per process (default: 5)")
    a("--csv", type=output_path, metavar="PATH", help="also write the table as CSV")
    a("--plot", type=output_path, metavar="PATH",
      help="draw the memory-vs-runtime frontier (PNG, matplotlib)")
    a("--timeline", type=output_path, metavar="PATH",
      help="draw every policy's live bytes over the step's kernels in one figure (PNG)")
    a("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=cmd_memsweep)


def cmd_cache(args: argparse.Namespace) -> int:
    from . import cache
    if args.action == "clear":
        n, size = cache.clear()
        print(f"removed {n} files ({_fmt_bytes(size)}) from {cache.cache_path()}")
        return EXIT_OK
    i = cache.info()
    print(f"path: {i['path']}" + ("" if i["exists"] else " (does not exist yet)"))
    print(f"size: {_fmt_bytes(i['bytes'])} in {i['files']} files")
    print(f"modules: {i['modules']}")
    print(f"numba files: {i['numba_files']}")
    if i["disk_cache_off"]:
        print(f"on-disk caching: OFF ({i['disk_cache_off']}); every process compiles again")
    if not i["problems"]:
        print("permissions: ok (private to this user)")
        return EXIT_OK
    print("permissions: UNSAFE, jitgrad refuses to load code through:")
    for problem in i["problems"]:
        print(f"  {problem.what} {problem}\n    {problem.fix}")
    return EXIT_DIVERGED  # 1: the cache cannot be used as it is


def _add_cache(sub: Any) -> None:
    p = sub.add_parser(
        "cache", help="show or clear the cache of compiled code",
        description="jitgrad's on-disk cache of generated modules and Numba's compiled code "
                    "(JITGRAD_CACHE_DIR, default ~/.cache/jitgrad). `info` prints where it is, "
                    "its size and whether it and every directory above it are safe from other "
                    "users (exit code 1 if not, listing each unsafe one); "
                    "`clear` removes jitgrad's files from it.")
    p.add_argument("action", choices=("info", "clear"))
    p.set_defaults(run=cmd_cache)


def cmd_show(args: argparse.Namespace) -> int:
    from . import show
    fn, example = show.load_target(args.target)
    if args.arg:
        example = tuple(show.parse_arg_spec(a) for a in args.arg)
    if example is None:
        raise ValueError(f"no example inputs for {args.target}: give them with --arg "
                         f"(e.g. --arg f32[64,784] --arg i64[64]) or define "
                         f"{show.EXAMPLE_ATTR} in the script")
    show.check_arguments(fn, example, args.target)
    for n in args.wrt or ():
        if not -len(example) <= n < len(example):
            raise ValueError(f"--wrt {n}: {args.target} takes {len(example)} argument(s)")
    everything = args.all
    with show.blame_script(args.target.rpartition(":")[0], args.target):
        show.show(fn, example, ir=args.ir or everything, grad=args.grad or everything,
                  optimized=args.optimized or everything, plan=args.plan or everything,
                  source=args.source, dot=args.dot, png=args.png, svg=args.svg,
                  timeline=args.timeline, draw=args.draw, edge_labels=args.edge_labels,
                  max_nodes=args.max_nodes, collapse=not args.no_collapse,
                  differentiate=args.differentiate, argnums=args.wrt,
                  remat=args.remat or None)
    return EXIT_OK


def _parse_argnums(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected argument positions like 0,1, got {text!r}"
                                         ) from None


def _add_show(sub: Any) -> None:
    p = sub.add_parser(
        "show", help="look inside a function: IR, gradient program, kernels, memory, pictures",
        description="Trace SCRIPT.py:FUNCTION on example inputs and show its stages. If it "
                    "returns a float scalar, the program shown is value_and_grad of it with "
                    "respect to argument 0, as jg.grad (--wrt to choose, --no-grad for the "
                    "function alone). Example inputs: --arg specs, in order, or the script's "
                    "__jitgrad_example__ (a tuple of arguments, a function returning one, or "
                    "a dict {FUNCTION: either}). Nothing is compiled.")
    a = p.add_argument
    a("target", metavar="SCRIPT.py:FUNCTION")
    a("--arg", action="append", metavar="SPEC",
      help="one positional argument, e.g. f32[64,784] or i64[64] (repeat, in order)")
    a("--ir", action="store_true", help="print the traced IR")
    a("--grad", action="store_true", help="print the gradient program")
    a("--optimized", action="store_true",
      help="print the program after the passes and its kernel calls (fused kernels)")
    a("--plan", action="store_true", help="print the memory plan table")
    a("--source", action="store_true", help="print the generated Numba source")
    a("--all", action="store_true", help="--ir --grad --optimized --plan")
    a("--dot", type=output_path, metavar="PATH", help="write the graph as Graphviz DOT text")
    a("--png", type=output_path, metavar="PATH",
      help="draw the graph as PNG (needs Graphviz's dot)")
    a("--svg", type=output_path, metavar="PATH",
      help="draw the graph as SVG (needs Graphviz's dot)")
    a("--draw", choices=("optimized", "grad", "traced"), default="optimized",
      help="which program the graph shows (default: optimized, with fused kernels boxed; "
           "grad: as back-propagation emits it, before the passes)")
    a("--edge-labels", action="store_true",
      help="label forward edges u -> v with the partial derivative dv/du they stand for")
    a("--max-nodes", type=positive_int, default=150, metavar="N",
      help="elide the middle of larger graphs (default: 150)")
    a("--no-collapse", action="store_true", help="draw repeated layers one by one")
    a("--timeline", type=output_path, metavar="PATH",
      help="plot live memory over the steps (matplotlib PNG); several --remat policies "
           "are overlaid")
    a("--remat", action="append", metavar="POLICY",
      help="recomputation policy: none, sqrt or a byte budget like 4MiB (repeat to overlay "
           "policies in --timeline; the first one is printed and drawn)")
    a("--wrt", type=_parse_argnums, metavar="I,J",
      help="differentiate with respect to these argument positions")
    a("--no-grad", dest="differentiate", action="store_const", const=False, default=None,
      help="show the function alone, even if it returns a scalar")
    p.set_defaults(run=cmd_show)


# One function per subcommand: it adds its parser and sets `run`.
SUBCOMMANDS: list[Callable[[Any], None]] = [_add_train, _add_memsweep, _add_show, _add_cache]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="jitgrad", description="jitgrad: reverse-mode autodiff compiled with Numba.")
    parser.add_argument("--version", action="version", version=f"jitgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jitgrad`` console script; returns the exit code."""
    try:
        return _run(argv)
    except BrokenPipeError:  # `jitgrad show ... | head`: the reader left, nothing to report
        # Python flushes stdout once more at exit: point it at /dev/null (Python's docs,
        # "Note on SIGPIPE") so that flush does not print a traceback of its own.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    try:
        return int(args.run(args))
    except BrokenPipeError:
        raise
    except (ValueError, OSError, MemoryError) as e:
        # bad input: JitgradError, CheckpointError, missing files, a model too big to fit
        message = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
            message = f"{message}: {e.filename}"
        if isinstance(e, MemoryError):
            message = f"out of memory: {message}"
        print(f"jitgrad {args.command}: error: {message.splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\njitgrad {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
