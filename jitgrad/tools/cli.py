"""The ``jitgrad`` command: it parses and prints, the work is elsewhere.

Each subcommand is one function that adds its parser and sets ``run`` (see
``_add_train``); list it in ``SUBCOMMANDS`` and it is wired in. A subcommand's
``run(args)`` returns the exit code; errors caused by bad input are raised as
``ValueError`` / ``OSError`` / ``MemoryError`` (``jg.JitgradError`` is a
``ValueError``) and reported by :func:`main` as one line on stderr with exit code 2;
argparse types (jitgrad.tools.options: ``output_path``, ``positive_int``, ...) refuse bad
flags before any work starts.

``jitgrad train`` runs jitgrad.training.recipe: an MLP or a conv net (``--model``; by default
on the bundled 8x8 digits) trained with one compiled program per step: forward, backward and
optimizer update.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import JitgradError
from ..training import recipe
from ..training.models import MODELS
from ..training.optim import OPTIMIZERS
from ..training.recipe import DTYPES, OPTIMIZER_DEFAULTS, PRECISIONS, SCHEDULES, TrainConfig
from .options import (
    format_bytes,
    output_path,
    parse_argnums,
    parse_byte_list,
    parse_bytes,
    parse_hidden,
    positive_int,
)

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader left


def _config_from_args(args: argparse.Namespace, saved: dict[str, Any] | None) -> TrainConfig:
    """Defaults, overridden by the resumed checkpoint's config, overridden by explicit flags."""
    base = TrainConfig.from_json(saved) if saved else TrainConfig()
    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **explicit)


def cmd_train(args: argparse.Namespace) -> int:
    if args.model == "gpt":
        return _train_gpt(args)
    if not args.distributed:
        return _train(args, None)
    from ..training import distributed
    comm = distributed.world()
    distributed.set_default_threads(comm)  # before anything compiles
    # An error on one rank must end the job, or the others wait in a collective forever.
    with distributed.abort_on_error(comm):
        return _train(args, comm)


def _train(args: argparse.Namespace, comm: Any) -> int:
    rank = 0 if comm is None else comm.Get_rank()
    resume_data = None if args.resume is None else recipe.read_checkpoint(args.resume, comm)
    cfg = _config_from_args(args, None if resume_data is None else resume_data[2].get("config"))
    out = None if args.quiet or rank != 0 else sys.stdout
    progress = not args.quiet and rank == 0 and sys.stderr.isatty()
    try:
        result = recipe.run_training(cfg, resume=args.resume, resume_data=resume_data,
                                     save=args.save, out=out, progress=progress, comm=comm)
    except recipe.TrainingDiverged as e:
        # The loss is reduced over the ranks, so they all diverge at the same step.
        if rank != 0:
            return EXIT_DIVERGED
        where = (f"{args.save} holds epoch {e.saved_epoch}" if e.saved_epoch
                 else "nothing was saved")
        print(f"jitgrad train: error: {e}; stopping ({where}). Try a smaller --lr.",
              file=sys.stderr)
        return EXIT_DIVERGED
    except recipe.TrainingInterrupted as e:
        if rank != 0:  # mpiexec interrupts every rank: one report
            return EXIT_INTERRUPTED
        where = (f"; {args.save} holds epoch {e.saved_epoch}, continue with "
                 f"--resume {args.save}" if e.saved_epoch else "; nothing was saved")
        print(f"\njitgrad train: {e}{where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    m = result.metrics
    if rank != 0:  # every rank holds the same metrics: rank 0 reports them
        return EXIT_OK
    for line in recipe.summary_lines(m):
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


# Flags of the MLP recipe that the GPT recipe has no use for.
_MLP_ONLY = ("hidden", "epochs", "optimizer", "momentum", "nesterov", "schedule", "remat",
             "memory_budget", "dropout", "resume", "distributed")
_GPT_FLAGS = ("data", "block_size", "batch_size", "n_layer", "n_head", "n_embd", "iters", "lr",
              "min_lr", "warmup", "beta2", "weight_decay", "clip", "eval_interval",
              "eval_batches", "dtype", "precision", "seed")


def _train_gpt(args: argparse.Namespace) -> int:
    """`jitgrad train --model gpt`: jitgrad.training.gpt_recipe."""
    from ..training import gpt_recipe
    given = [f for f in _MLP_ONLY if getattr(args, f) not in (None, False)]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is a flag of the MLP recipe, not of "
                         f"--model gpt")
    cfg = gpt_recipe.GPTTrainConfig(**{f: getattr(args, f) for f in _GPT_FLAGS
                                       if getattr(args, f) is not None})
    m = gpt_recipe.run(cfg, save=args.save, out=None if args.quiet else sys.stdout,
                       progress=not args.quiet and sys.stderr.isatty())
    for line in gpt_recipe.summary_lines(m):
        print(line)
    if args.save:
        print(f"saved {args.save}")
    if args.json:
        print(json.dumps({k: v for k, v in m.items()}))
    return EXIT_OK


def _add_gpt_flags(p: Any) -> None:
    from ..training.gpt_recipe import GPTTrainConfig
    d = GPTTrainConfig()
    g = p.add_argument_group("GPT (--model gpt; --data is a UTF-8 text file, default: the "
                             "bundled tiny Shakespeare; --batch-size default 12, --lr 1e-3, "
                             "--weight-decay 0.1)").add_argument
    g("--iters", type=positive_int, metavar="N", help=f"training steps (default: {d.iters})")
    g("--block-size", type=positive_int, metavar="N", help=f"context (default: {d.block_size})")
    g("--n-layer", type=positive_int, metavar="N", help=f"default: {d.n_layer}")
    g("--n-head", type=positive_int, metavar="N", help=f"default: {d.n_head}")
    g("--n-embd", type=positive_int, metavar="N", help=f"width (default: {d.n_embd})")
    g("--warmup", type=int, metavar="N", help=f"linear warm-up steps (default: {d.warmup})")
    g("--min-lr", type=float, help=f"the cosine decay's floor (default: {d.min_lr})")
    g("--beta2", type=float, help=f"AdamW's beta2 (default: {d.beta2})")
    g("--clip", type=float, metavar="NORM", help=f"gradient clipping norm (default: {d.clip})")
    g("--eval-interval", type=positive_int, metavar="N",
      help=f"steps between evaluations (default: {d.eval_interval})")
    g("--eval-batches", type=positive_int, metavar="N",
      help=f"fixed validation batches averaged (default: {d.eval_batches})")


def _add_train(sub: Any) -> None:
    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train an MLP, a conv net or a GPT (default: an MLP on the bundled digits)",
        description="Train a classifier with a compiled forward+backward+update step. "
                    "Defaults reach about 98% test accuracy on the bundled digits in a few "
                    "seconds (the conv net, --model cnn, about 98.5%). With --resume, "
                    "settings not given on the command line come from the checkpoint.")
    # Defaults are None so that --resume can tell explicit flags from defaults; the
    # effective defaults (TrainConfig) are shown in the help text.
    a = p.add_argument
    a("--data", metavar="PATH", help="directory of MNIST-style IDX files, or a .npz/.csv "
      "file (default: bundled digits)")
    a("--model", choices=[*MODELS, "gpt"], help=f"default: {d.model}; cnn: conv3x3(16)-relu-"
      "maxpool2-conv3x3(32)-relu-maxpool2-linear, lenet5: LeNet-5 (28x28 inputs); gpt: a "
      "character-level GPT (its own flags, below)")
    a("--hidden", type=parse_hidden, metavar="W1,W2,...",
      help=f"hidden layer widths of the MLP (default: {','.join(map(str, d.hidden))})")
    a("--epochs", type=int, metavar="N", help="total epochs (default: " + ", ".join(
        f"{k} {m.epochs}" for k, m in MODELS.items()) + ")")
    a("--batch-size", type=int, metavar="N", help=f"default: {d.batch_size}")
    a("--lr", type=float, help="learning rate (default: " + ", ".join(
        f"{k} {v['lr']}" for k, v in OPTIMIZER_DEFAULTS.items()) + ")")
    a("--optimizer", choices=list(OPTIMIZERS), help=f"default: {d.optimizer}")
    a("--momentum", type=float, help=f"SGD momentum (default: {d.momentum})")
    a("--nesterov", action=argparse.BooleanOptionalAction,
      help="Nesterov momentum for SGD (default: on)")
    a("--weight-decay", type=float, help="default: " + ", ".join(
        f"{k} {v['weight_decay']}" for k, v in OPTIMIZER_DEFAULTS.items()))
    a("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default: {d.schedule}; "
      "step divides the rate by 10 after each third of training)")
    a("--dtype", choices=DTYPES, help=f"default: {d.dtype}")
    a("--precision", choices=PRECISIONS,
      help=f"bf16: mixed precision, GEMM operands rounded to bfloat16 with float32 "
           f"accumulation, float32 master weights (as torch.autocast; bfloat16 GEMMs on "
           f"CPUs with AMX/AVX512_BF16 and the mkl extra) (default: {d.precision})")
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
    _add_gpt_flags(p)
    p.set_defaults(run=cmd_train)


def cmd_sample(args: argparse.Namespace) -> int:
    from ..training.gpt_recipe import Sampler
    sampler = Sampler.load(args.checkpoint)
    generated, rate = sampler.generate(args.prompt, args.tokens, args.temperature, args.top_k,
                                       args.seed)
    print(args.prompt + generated)
    print(f"{args.tokens} tokens at {rate:,.0f} tokens/s", file=sys.stderr)
    return EXIT_OK


def _add_sample(sub: Any) -> None:
    p = sub.add_parser(
        "sample", help="generate text from a GPT checkpoint (jitgrad train --model gpt --save)",
        description="Generate characters from a checkpoint of `jitgrad train --model gpt`, "
                    "one compiled forward pass of the block size per character.")
    a = p.add_argument
    a("checkpoint", metavar="CHECKPOINT")
    a("--tokens", type=int, default=500, metavar="N", help="characters to generate "
      "(default: 500)")
    a("--temperature", type=float, default=0.8, help="default: 0.8")
    a("--top-k", type=positive_int, default=None, metavar="K",
      help="sample among the K likeliest characters only (default: all)")
    a("--seed", type=int, default=0, help="default: 0")
    a("--prompt", default="\n", metavar="TEXT", help="the text to continue (default: a "
      "newline)")
    p.set_defaults(run=cmd_sample)


def cmd_memsweep(args: argparse.Namespace) -> int:
    from . import memsweep
    for name in ("depth", "width", "batch", "n_head", "block", "rounds", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got "
                             f"{getattr(args, name)}")
    if args.model == "gpt":  # --depth and --width are its layers and width
        sizes = {"n_layer": args.depth, "n_embd": args.width, "n_head": args.n_head,
                 "block": args.block, "batch": args.batch}
        model: Any = memsweep.GPTModel(**{k: v for k, v in sizes.items() if v is not None},
                                       dtype=args.dtype)
    else:
        sizes = {"depth": args.depth, "width": args.width, "batch": args.batch}
        model = memsweep.Model(**{k: v for k, v in sizes.items() if v is not None},
                               dtype=args.dtype)
    named = [p for p in (args.policies or ("none,sqrt,blocks" if args.model == "gpt"
                                           else "none,sqrt")).split(",") if p]
    for p in named:  # before any planning: a typo costs nothing
        if p not in memsweep.POLICIES or (p == "blocks" and args.model != "gpt"):
            raise ValueError(f"unknown policy {p!r}: use none, sqrt, full, blocks (GPT only) "
                             f"and --budgets")
    budgets = args.budgets if args.budgets is not None else memsweep.default_budgets(
        model, [0.25, 0.5, 0.75])
    policies = named + [str(b) for b in budgets]
    title = model.title
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


def _add_memsweep(sub: Any) -> None:
    p = sub.add_parser(
        "memsweep", help="memory vs runtime of a training step under recomputation policies",
        description="Compile a deep ReLU MLP (or GPT) training step under each recomputation "
                    "policy (none, sqrt, byte budgets; GPT: also blocks, each transformer "
                    "block checkpointed), each in its own process, alternating over "
                    "rounds, and print planned peak, measured peak, step time and "
                    "recomputation per policy.")
    a = p.add_argument
    a("--model", choices=("mlp", "gpt"), default="mlp",
      help="mlp: a deep ReLU chain; gpt: a GPT's AdamW step (default: mlp)")
    a("--depth", type=int, help="layers (default: MLP 32, GPT 6)")
    a("--width", type=int, help="layer width (default: MLP 256, GPT 384)")
    a("--batch", type=int, help="batch size (default: MLP 1024, GPT 8)")
    a("--n-head", type=int, help="GPT attention heads (default: 6)")
    a("--block", type=int, help="GPT block size (default: 256)")
    a("--dtype", choices=DTYPES, default="float32")
    a("--policies", help="comma-separated: none, sqrt, full, blocks (GPT) "
      "(default: none,sqrt; GPT none,sqrt,blocks)")
    a("--budgets", type=parse_byte_list, metavar="B1,B2,...",
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
    from ..compiler import cache
    if args.action == "clear":
        n, size = cache.clear()
        print(f"removed {n} files ({format_bytes(size)}) from {cache.cache_path()}")
        return EXIT_OK
    i = cache.info()
    print(f"path: {i['path']}" + ("" if i["exists"] else " (does not exist yet)"))
    print(f"size: {format_bytes(i['bytes'])} in {i['files']} files")
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
    a("--wrt", type=parse_argnums, metavar="I,J",
      help="differentiate with respect to these argument positions")
    a("--no-grad", dest="differentiate", action="store_const", const=False, default=None,
      help="show the function alone, even if it returns a scalar")
    p.set_defaults(run=cmd_show)


# One function per subcommand: it adds its parser and sets `run`.
SUBCOMMANDS: list[Callable[[Any], None]] = [_add_train, _add_sample, _add_memsweep, _add_show,
                                            _add_cache]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
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
