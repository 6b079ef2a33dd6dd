"""The training recipe behind ``jitgrad train``: a classifier (an MLP, or a conv net:
models.MODELS) trained with one
compiled program per step (forward, backward and optimizer update), evaluated after
every epoch, checkpointed atomically, optionally data-parallel over MPI ranks.

:class:`TrainConfig` says what to train; :func:`run_training` trains it and returns
the metrics that ``jitgrad train`` prints (:func:`summary_lines`, ``--json``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import sys
import time
import types
import typing
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

from ..errors import JitgradError
from ..frontend import random
from ..frontend.api import jit
from ..tools.options import format_bytes
from . import checkpoint_io, optim
from .data import Dataset, batches_per_epoch, check_labels, load_dataset, minibatches
from .models import MODELS
from .train import TrainStep, train_step

# ------------------------------------------------------------------------------ config

# Where the recipe's learning rate and weight decay are not the optimizer's own defaults
# (PyTorch's): SGD's are tuned on the bundled digits.
_TUNED = {"sgd": {"lr": 0.05, "weight_decay": 2e-3}}


def _defaults(name: str) -> dict[str, float]:
    takes = inspect.signature(optim.OPTIMIZERS[name]).parameters
    return {k: takes[k].default for k in ("lr", "weight_decay")} | _TUNED.get(name, {})


# The flags whose sensible value depends on the optimizer, for every one of optim.OPTIMIZERS.
OPTIMIZER_DEFAULTS = {name: _defaults(name) for name in optim.OPTIMIZERS}
SCHEDULES = ("constant", "step", "cosine")
DTYPES = ("float32", "float64")
PRECISIONS = ("f32", "bf16")  # jitgrad.compiler.precision: bf16 rounds the GEMM operands


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` for lr / weight_decay means the
    optimizer's default (OPTIMIZER_DEFAULTS)."""

    data: str | None = None
    model: str = "mlp"
    hidden: tuple[int, ...] = (512,)
    epochs: int | None = None  # None: the model's (models.MODELS)
    batch_size: int = 32
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None
    schedule: str = "cosine"
    dtype: str = "float32"
    precision: str = "f32"
    seed: int = 0
    remat: str | None = None
    memory_budget: int | None = None
    eval_batch_size: int = 1024
    dropout: float = 0.0

    def resolved(self) -> TrainConfig:
        """A copy with model- and optimizer-dependent defaults filled in and every field
        validated."""
        if self.optimizer not in OPTIMIZER_DEFAULTS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use one of "
                             f"{', '.join(OPTIMIZER_DEFAULTS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: use one of {', '.join(MODELS)}")
        d = OPTIMIZER_DEFAULTS[self.optimizer]
        cfg = dataclasses.replace(
            self, hidden=tuple(int(h) for h in self.hidden),
            epochs=MODELS[self.model].epochs if self.epochs is None else self.epochs,
            lr=default_lr(self) if self.lr is None else float(self.lr),
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
            (cfg.precision in PRECISIONS, f"unknown precision {cfg.precision!r}: use "
             f"{' or '.join(PRECISIONS)}"),
            (cfg.precision == "f32" or cfg.dtype == "float32",
             f"--precision {cfg.precision} rounds float32 GEMM operands: it needs "
             f"--dtype float32, not {cfg.dtype}"),
            (all(h >= 1 for h in cfg.hidden), f"hidden sizes must be positive, got {cfg.hidden}"),
            (cfg.memory_budget is None or cfg.memory_budget > 0,
             "--memory-budget must be positive"),
            (cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}"),
            (0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        from ..compiler.remat import check_policy
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


def default_lr(cfg: TrainConfig) -> float:
    """The learning rate without --lr: the model's tuned one, else the optimizer's."""
    model = MODELS.get(cfg.model)
    tuned = model.lr if model is not None else {}
    return tuned.get(cfg.optimizer, OPTIMIZER_DEFAULTS[cfg.optimizer]["lr"])


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
    return dataclasses.replace(cfg, lr=default_lr(cfg) * factor)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optim.Optimizer:
    """The optimizer of optim.OPTIMIZERS that ``cfg`` names, with its learning-rate schedule;
    it takes the settings of ``cfg`` its constructor has (SGD: momentum and nesterov)."""
    if cfg.schedule == "cosine":
        schedule: optim.Schedule = optim.Cosine(total_steps)
    elif cfg.schedule == "step":
        # Divide the learning rate by 10 after each third of training.
        schedule = optim.StepDecay(max(1, math.ceil(total_steps / 3)), gamma=0.1)
    else:
        schedule = optim.Constant()
    cls = optim.OPTIMIZERS[cfg.optimizer]
    settings = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "momentum": cfg.momentum,
                "nesterov": cfg.nesterov and cfg.momentum > 0, "schedule": schedule}
    takes = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in settings.items() if k in takes})


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
    check_labels(ds.y_test, train_classes, what=f"{ds.name}: test label",
                 out_of_range=f"out of range: training labels are 0..{train_classes - 1}")
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
    """Train ``cfg.model`` (models.MODELS) as ``cfg`` says; print per-epoch lines to
    ``out`` (None: silent).

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

    model = MODELS[cfg.model]
    sizes = model.sizes(ds.n_features, ds.n_classes, cfg.hidden)
    params = model.init(ds.n_features, ds.n_classes, cfg.hidden,
                        np.random.default_rng(cfg.seed), dtype)
    opt = make_optimizer(cfg, total_steps)
    jit_options: dict[str, Any] = {}
    if cfg.precision != "f32":
        jit_options["precision"] = cfg.precision
    if cfg.remat is not None:
        jit_options["remat"] = cfg.remat
    if cfg.memory_budget is not None:
        jit_options["memory_budget"] = cfg.memory_budget
    if comm is not None:
        jit_options["comm"] = comm
    loss_fn: Callable[..., Any] = model.loss
    if cfg.dropout:  # a key per step (fold_in(key, t)): saved, so a resume is exact
        loss_fn = functools.partial(model.loss, dropout_rate=cfg.dropout)
        jit_options["key"] = random.key(cfg.seed)
    step = train_step(loss_fn, params, opt, **jit_options)
    if resume_data is not None:
        checkpoint_io.restore_into(step.params, step.state, resume_data[0], resume_data[1],
                                   source)
        checkpoint_io.restore_step(step, resume_data[2], source)
        if comm is not None:
            step.broadcast()  # every rank continues from rank 0's copy
    # evaluated under the policy it was trained with, as an autocast model is served
    forward = jit(model.logits, precision=jit_options.get("precision"))

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
        from ..compiler.threads import num_threads
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
        "planned_peak_bytes": getattr(plan, "arena_bytes", None),
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


def read_checkpoint(path: str | os.PathLike[str], comm: Any = None
                    ) -> tuple[Any, Any, dict[str, Any]]:
    """(params, state, meta) of a checkpoint ``jitgrad train`` wrote, its config checked
    complete and valid. In a distributed run rank 0 reads it and sends it to the other
    ranks: no shared disk needed."""
    rank = 0 if comm is None else comm.Get_rank()
    data = checkpoint_io.load(path) if rank == 0 else None
    if comm is not None:
        data = comm.bcast(data, root=0)
    saved = data[2].get("config")
    try:
        TrainConfig.from_json({} if saved is None else saved).resolved()
    except ValueError as e:
        raise checkpoint_io.CheckpointError(
            f"checkpoint {str(path)!r} holds an invalid training config: {e}") from None
    return data


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
        f"planned memory {format_bytes(m['planned_peak_bytes'])}  "
        f"wall time {m['wall_time_s']:.2f} s",
    ]
