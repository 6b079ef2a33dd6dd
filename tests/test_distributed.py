"""Data-parallel training on MPI: the pinned gradient buffer, sharded batches, and real
`mpiexec -n 2` jobs (equivalence with one process, failures, the CLI).

The MPI jobs need the `mpi` extra (mpi4py + an MPI with mpiexec); `.ci/run` installs
it. Without it those tests are skipped, saying so.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jitgrad as jg
from jitgrad.compiler import memory
from jitgrad.frontend.api import CompiledFunction
from jitgrad.frontend.ir import Var
from jitgrad.training import checkpoint_io, nn, recipe
from jitgrad.training.data import minibatches

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "mpi_worker.py"
TIMEOUT = 240  # a hang is a failure, never a stuck CI run


def _mpiexec() -> str | None:
    # The mpich wheel puts mpiexec beside the interpreter; a system MPI is on PATH.
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(
    not (HAVE_MPI4PY and MPIEXEC),
    reason="needs mpi4py and mpiexec: pip install -e '.[mpi]' (mpi4py + the mpich wheel); "
           f"mpi4py {'found' if HAVE_MPI4PY else 'missing'}, "
           f"mpiexec {'found' if MPIEXEC else 'missing'}")


def run_mpi(n: int, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JITGRAD_NUM_THREADS="1")
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


# ------------------------------------------------------------- planner and backend


def test_plan_pins_values_back_to_back_and_live_throughout():
    a, b, c, d = (Var((n,), np.dtype(np.float32)) for n in (3, 40, 7, 100))
    steps = [memory.StepUse([a], []), memory.StepUse([b], [a]), memory.StepUse([c], [b]),
             memory.StepUse([d], [c])]
    p = memory.plan(steps, [d], set(), pinned=[c, a])
    assert (p.buffers[c].offset, p.buffers[a].offset) == (0, 64)
    assert p.pinned_bytes == 128
    assert p.buffers[b].offset >= 128 and p.buffers[d].offset >= 128
    assert (p.buffers[a].start, p.buffers[a].end) == (0, 3)
    with pytest.raises(ValueError, match="twice"):
        memory.plan(steps, [d], set(), pinned=[a, a])


def test_pinned_results_are_one_region_of_the_arena():
    rng = np.random.default_rng(0)
    params = nn.mlp_init([6, 8, 3], rng)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0])

    def f(p, x, y):
        return jg.value_and_grad(nn.mlp_loss)(p, x, y)

    cf = CompiledFunction(f, pinned=range(5), backend="numba")
    loss, grads = cf(params, x, y)
    ref_loss, ref_grads = jg.jit(f, backend="interpret")(params, x, y)
    region = cf._last.executable.pinned_region()
    assert region.nbytes == cf.plan.pinned_bytes > 0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    offsets = []
    for k in sorted(grads):  # flatten order of a dict: sorted keys
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)
        assert np.shares_memory(grads[k], region)
        offsets.append(grads[k].__array_interface__["data"][0])
    assert offsets == sorted(offsets)  # in result order


def test_pinned_result_that_is_an_input_or_a_repeat_gets_a_slot_of_its_own():
    def f(x):
        y = x * 2.0
        return y, y, x

    cf = CompiledFunction(f, pinned=[0, 1, 2], backend="numba")
    x = np.arange(5, dtype=np.float32)
    a, b, c = cf(x)
    region = cf._last.executable.pinned_region()
    for r, want in ((a, 2 * x), (b, 2 * x), (c, x)):
        np.testing.assert_array_equal(r, want)
        assert np.shares_memory(r, region)
    assert not np.shares_memory(c, x) and not np.shares_memory(a, b)
    assert cf.plan.pinned_bytes == 3 * 64


# ------------------------------------------------------------------------ sharding


def test_rank_shards_partition_each_global_batch():
    x = np.arange(50, dtype=np.float32)[:, None]
    y = np.arange(50)
    single = list(minibatches(x, y, 12, 7))
    shards = [list(minibatches(x, y, 4, 7, rank=r, num_ranks=3)) for r in range(3)]
    assert all(len(s) == len(single) == 4 for s in shards)
    for k, (_, yb) in enumerate(single):
        parts = [shards[r][k][1] for r in range(3)]
        np.testing.assert_array_equal(np.concatenate(parts), yb)
    with pytest.raises(ValueError, match="rank 3"):
        minibatches(x, y, 4, 7, rank=3, num_ranks=3)


def test_default_lr_scales_with_the_number_of_ranks():
    cfg = recipe.TrainConfig()
    assert recipe.scale_default_lr(cfg, 1) is cfg
    assert recipe.scale_default_lr(cfg, 4).resolved().lr == pytest.approx(0.2)
    assert recipe.scale_default_lr(recipe.TrainConfig(optimizer="adam"), 4).resolved().lr == \
        pytest.approx(2e-3)
    assert recipe.scale_default_lr(recipe.TrainConfig(lr=0.01), 4).resolved().lr == 0.01


def test_threads_default_to_an_even_share_of_the_cores_per_rank(monkeypatch):
    from jitgrad.compiler import threads
    monkeypatch.delenv("JITGRAD_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("MPI_LOCALNRANKS", raising=False)
    assert threads.num_threads() == 8
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")  # what mpiexec (Hydra) sets for each rank
    assert threads.num_threads() == 4
    monkeypatch.setenv("MPI_LOCALNRANKS", "16")
    assert threads.num_threads() == 1
    monkeypatch.setenv("JITGRAD_NUM_THREADS", "3")
    assert threads.num_threads() == 3


def test_distributed_without_mpi4py_says_how_to_install(monkeypatch):
    from jitgrad.training import distributed
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails as if not installed
    with pytest.raises(jg.JitgradError, match=r"jitgrad\[mpi\]"):
        distributed.mpi()


class OneRankComm:
    """A communicator of one rank, in process: the collectives are identities. Runs the
    distributed step's own code paths (both backends) without MPI."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Bcast(self, buf, root=0):
        pass

    def Allreduce(self, sendbuf, recvbuf, op=None):
        self.reduced = np.array(recvbuf, copy=True)

    def allgather(self, value):
        return [value]


@pytest.fixture
def one_rank(monkeypatch):
    from types import SimpleNamespace

    from jitgrad.training import distributed
    monkeypatch.setattr(distributed, "mpi", lambda: SimpleNamespace(IN_PLACE=None, SUM=None))
    return OneRankComm()


def _two_copies_of_a_problem(seed):
    """(x, y, params, a copy of params) of a small classifier."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    p1 = nn.mlp_init([5, 7, 3], np.random.default_rng(1))
    return x, y, p1, {k: v.copy() for k, v in p1.items()}


def test_distributed_step_on_one_rank_matches_train_step(backend, one_rank):
    x, y, p1, p2 = _two_copies_of_a_problem(3)
    opt = jg.optim.Adam(lr=0.05, weight_decay=1e-3)
    ref = jg.train_step(nn.mlp_loss, p1, opt)
    dist = jg.train_step(nn.mlp_loss, p2, opt, comm=one_rank)
    for _ in range(3):
        np.testing.assert_allclose(dist(x, y), ref(x, y), rtol=1e-6)
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=1e-7)
    # What went through the collective: [loss, failure count, gradients...] in one buffer.
    assert one_rank.reduced.dtype == np.float32
    assert one_rank.reduced[1] == 0
    assert one_rank.reduced.size >= 2 + sum(v.size for v in p1.values())


def test_distributed_step_failure_leaves_params_untouched(backend, one_rank):
    x = np.ones((4, 5), np.float32)
    params = nn.mlp_init([5, 7, 3], np.random.default_rng(1))
    step = jg.train_step(nn.mlp_loss, params, jg.optim.SGD(lr=0.1), comm=one_rank)
    step(x, np.array([0, 1, 2, 0]))
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises(jg.JitgradError, match=r"failed on 1 of 1 ranks \(rank 0: "):
        step(x, np.array([0, 1, 9, 0]))
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    assert step.t == 1
    step(x, np.array([0, 1, 2, 0]))
    assert step.t == 2


def test_distributed_step_with_a_key_folds_in_the_rank(backend, one_rank):
    # rank r's step t uses fold_in(fold_in(key, t), r): dropout masks differ across shards
    x, y, p1, p2 = _two_copies_of_a_problem(4)
    opt, key = jg.optim.SGD(lr=0.1), jg.random.key(8)

    def rank0_loss(p, x, y, key):
        return nn.mlp_loss(p, x, y, dropout_rate=0.5, key=jg.random.fold_in(key, 0))

    ref = jg.train_step(rank0_loss, p1, opt, key=key)
    dist = jg.train_step(lambda p, x, y, key: nn.mlp_loss(p, x, y, dropout_rate=0.5, key=key),
                         p2, opt, comm=one_rank, key=key)
    for _ in range(3):
        np.testing.assert_allclose(dist(x, y), ref(x, y), rtol=1e-6)
    assert dist.t == ref.t == 3
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=1e-7)


def test_distributed_step_rejects_mixed_dtypes(one_rank):
    params = {"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float64)}
    with pytest.raises(jg.JitgradError, match="mix"):
        jg.train_step(lambda p, x: jg.sum(p["a"] * x), params, jg.optim.SGD(), comm=one_rank)


# -------------------------------------------------------------------- MPI jobs


@needs_mpi
def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path):
    import mpi_worker as w
    out = tmp_path / "equiv"
    r = run_mpi(2, str(WORKER), "equiv", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = [dict(np.load(f"{out}.rank{i}.npz")) for i in range(2)]
    for k in ranks[0]:  # the ranks agree bit for bit: same reduced gradients, same update
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k])

    x, y = w.problem()
    params = nn.mlp_init(w.SIZES, np.random.default_rng(0), np.float64)
    step = jg.train_step(nn.mlp_loss, params, w.optimizer())
    losses = [float(step(xb, yb)) for _, (xb, yb) in
              zip(range(w.STEPS), minibatches(x, y, 2 * w.PER_RANK_BATCH, 0))]
    np.testing.assert_allclose(ranks[0]["losses"], losses, rtol=1e-12)
    for k, v in params.items():
        np.testing.assert_allclose(ranks[0][k], v, rtol=1e-10, atol=1e-12)


@needs_mpi
def test_a_failed_step_on_one_rank_fails_on_every_rank_and_changes_nothing(tmp_path):
    r = run_mpi(2, str(WORKER), "label", str(tmp_path / "x"))
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        assert f"rank {rank} caught: training step 2 failed on 1 of 2 ranks (rank 1: " in r.stdout
        assert f"rank {rank} continued at step 2" in r.stdout
    assert "unchanged=False" not in r.stdout and "no error" not in r.stdout
    assert "out of range" in r.stdout


@needs_mpi
def test_a_rank_that_raises_aborts_the_job_naming_the_rank(tmp_path):
    r = run_mpi(2, str(WORKER), "raise", str(tmp_path / "x"))  # times out if it hangs
    assert r.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: injected fault" in r.stderr
    assert "went unnoticed" not in r.stdout


@needs_mpi
def test_cli_distributed_trains_like_one_process_with_the_global_batch(tmp_path):
    flags = ["--hidden", "16", "--epochs", "2", "--lr", "0.05", "--dtype", "float64"]
    ckpt = tmp_path / "dist.npz"
    r = run_mpi(2, "-m", "jitgrad", "train", "--distributed", "--batch-size", "32",
                "--json", "--save", str(ckpt), *flags, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("test accuracy") == 1  # rank 0 alone prints
    assert "2 ranks x batch 32 = global batch 64" in r.stdout
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["ranks"] == 2 and metrics["global_batch_size"] == 64
    assert 0 <= metrics["allreduce_share"] <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.npz"]  # saved once

    cfg = recipe.TrainConfig(hidden=(16,), epochs=2, lr=0.05, batch_size=64, dtype="float64")
    single = recipe.run_training(cfg, out=None)
    saved, _, meta = checkpoint_io.load(ckpt)
    assert meta["step"] == single.metrics["steps"]
    for k, v in single.params.items():
        np.testing.assert_allclose(saved[k], v, rtol=1e-9, atol=1e-12)
    assert metrics["test_accuracy"] == pytest.approx(single.metrics["test_accuracy"])


@needs_mpi
def test_cli_distributed_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    # A constant rate: the 2-epoch run is then a prefix of the 3-epoch one.
    flags = ["--distributed", "--hidden", "16", "--batch-size", "32", "--quiet",
             "--schedule", "constant"]
    runs = [("full.npz", "3", []), ("part.npz", "2", []),
            ("part.npz", "3", ["--resume", str(tmp_path / "part.npz")])]
    for name, epochs, extra in runs:
        r = run_mpi(2, "-m", "jitgrad", "train", *flags, "--epochs", epochs,
                    "--save", str(tmp_path / name), *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    full, part = (checkpoint_io.load(tmp_path / n) for n in ("full.npz", "part.npz"))
    assert part[2]["epoch"] == full[2]["epoch"] == 3
    for k in full[0]:
        np.testing.assert_array_equal(part[0][k], full[0][k])


@needs_mpi
def test_cli_distributed_error_on_every_rank_ends_the_job(tmp_path):
    r = run_mpi(2, "-m", "jitgrad", "train", "--distributed", "--data",
                str(tmp_path / "missing.npz"), cwd=tmp_path)
    assert r.returncode != 0
    assert "of 2 failed: FileNotFoundError" in r.stderr
