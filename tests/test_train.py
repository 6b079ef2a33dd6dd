"""train_step semantics, checkpoints, and the `jitgrad train` command end to end.

All training runs share one tiny model (64-16-10, batch 64, float32) so that the
whole file reuses a single compiled step program.
"""

import dataclasses
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import jitgrad as jg
from jitgrad.tools import cli, options
from jitgrad.training import checkpoint_io, nn, recipe
from jitgrad.training.checkpoint_io import CheckpointError

TINY = ["--hidden", "16", "--batch-size", "64"]
TINY_CFG = recipe.TrainConfig(hidden=(16,), batch_size=64)


def copy_tree(t):
    if isinstance(t, dict):
        return {k: copy_tree(v) for k, v in t.items()}
    return np.array(t, copy=True)


def assert_tree_equal(a, b):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            assert_tree_equal(a[k], b[k])
    else:
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------- train_step


@pytest.fixture(scope="module")
def mlp_step():
    """One compiled step, shared: (step, x, y)."""
    rng = np.random.default_rng(0)
    params = nn.mlp_init([6, 8, 3], rng)
    step = jg.train_step(nn.mlp_loss, params, jg.optim.Adam(lr=0.01))
    x = rng.standard_normal((5, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0])
    return step, x, y


def test_train_step_updates_in_place(mlp_step):
    step, x, y = mlp_step
    ids = {k: id(v) for k, v in step.params.items()}
    before = copy_tree(step.params)
    expected_loss = float(nn.mlp_loss(before, x, y))
    t0 = step.t
    loss = step(x, y)
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
    assert step.t == t0 + 1
    assert {k: id(v) for k, v in step.params.items()} == ids  # the caller's arrays
    assert all(not np.array_equal(before[k], step.params[k]) for k in before)
    assert np.any(step.state["m"]["W0"] != 0)


def test_failing_step_changes_nothing(mlp_step):
    step, x, y = mlp_step
    step(x, y)  # make the state non-trivial first
    params, state, t = copy_tree(step.params), copy_tree(step.state), step.t
    bad = y.copy()
    bad[3] = 7  # out of range for 3 classes
    with pytest.raises(jg.JitgradError, match="out of range"):
        step(x, bad)
    assert_tree_equal(step.params, params)
    assert_tree_equal(step.state, state)
    assert step.t == t
    step(x, y)  # and the step still works afterwards
    assert step.t == t + 1


# ------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip(tmp_path):
    params = {"W0": np.arange(6.0).reshape(2, 3), "b0": np.ones(3, np.float32)}
    state = {"m": {"W0": np.zeros((2, 3)), "b0": np.zeros(3, np.float32)},
             "extra": [np.int64(3), (np.arange(2),)]}
    path = checkpoint_io.save(tmp_path / "ck.npz", params, state, {"epoch": 3, "note": "hi"})
    p, s, meta = checkpoint_io.load(path)
    assert_tree_equal(p, params)
    assert p["b0"].dtype == np.float32
    assert isinstance(s["extra"], list) and isinstance(s["extra"][1], tuple)
    np.testing.assert_array_equal(s["extra"][1][0], np.arange(2))
    assert meta == {"epoch": 3, "note": "hi"}
    assert [f.name for f in tmp_path.iterdir()] == ["ck.npz"]  # no temp files left


def test_checkpoint_archive_layout(tmp_path):
    # The names and the header's structure are the file format: old checkpoints must load.
    state = {"m": [np.ones(2), (np.zeros(1), None)], "t": np.array(3)}
    path = checkpoint_io.save(tmp_path / "ck.npz", {"W0": np.ones((2, 3))}, state)
    with np.load(path) as z:
        assert sorted(z.files) == ["__meta__", "params/W0", "state/m/0", "state/m/1/0",
                                   "state/t"]
        header = json.loads(str(z["__meta__"]))
    assert header["structure"] == {
        "params": {"dict": {"W0": "leaf"}},
        "state": {"dict": {"m": {"list": ["leaf", {"tuple": ["leaf", None]}]}, "t": "leaf"}}}
    _, s, _ = checkpoint_io.load(path)
    assert isinstance(s["m"][1], tuple) and s["m"][1][1] is None


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    checkpoint_io.save(path, {"w": np.ones(3)}, {}, {"epoch": 1})
    original = path.read_bytes()

    def interrupted(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_io.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_io.save(path, {"w": np.zeros(3)}, {}, {"epoch": 2})
    assert path.read_bytes() == original
    assert [f.name for f in tmp_path.iterdir()] == ["ck.npz"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_io.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint_io.load(bad)
    good = checkpoint_io.save(tmp_path / "good.npz", {"w": np.ones(4)}, {}, {})
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint_io.load(truncated)
    other = tmp_path / "other.npz"
    np.savez(other, w=np.ones(2))
    with pytest.raises(CheckpointError, match="not a jitgrad checkpoint"):
        checkpoint_io.load(other)
    with pytest.raises(CheckpointError, match="JSON"):
        checkpoint_io.save(tmp_path / "x.npz", {"w": np.ones(1)}, {}, {"f": object()})
    with pytest.raises(CheckpointError, match="directory"):
        checkpoint_io.save(tmp_path / "nodir" / "x.npz", {"w": np.ones(1)}, {}, {})


def test_restore_checks_before_copying():
    dst_p, dst_s = {"W0": np.zeros((2, 3)), "b0": np.zeros(3)}, {"m": {"W0": np.zeros((2, 3))}}
    with pytest.raises(CheckpointError, match=r"W0 has shape \(3, 2\)"):
        checkpoint_io.restore_into(dst_p, dst_s, {"W0": np.ones((3, 2)), "b0": np.ones(3)},
                                   {"m": {"W0": np.ones((2, 3))}})
    with pytest.raises(CheckpointError, match="missing state/m/W0"):
        checkpoint_io.restore_into(dst_p, dst_s, {"W0": np.ones((2, 3)), "b0": np.ones(3)}, {})
    with pytest.raises(CheckpointError, match="dtype float32"):
        checkpoint_io.restore_into(dst_p, dst_s, {"W0": np.ones((2, 3), np.float32),
                                                  "b0": np.ones(3)}, {"m": {"W0": np.ones((2, 3))}})
    assert not any(v.any() for v in dst_p.values())  # nothing was copied
    checkpoint_io.restore_into(dst_p, dst_s, {"W0": np.ones((2, 3)), "b0": np.ones(3)},
                               {"m": {"W0": np.full((2, 3), 2.0)}})
    assert dst_p["W0"].sum() == 6 and dst_s["m"]["W0"].sum() == 12


# ---------------------------------------------------------------- save / resume equivalence


def test_resume_equals_uninterrupted_constant_schedule(tmp_path):
    full = recipe.run_training(dataclasses.replace(TINY_CFG, epochs=2, schedule="constant"),
                            out=None)
    ck = tmp_path / "ck.npz"
    recipe.run_training(dataclasses.replace(TINY_CFG, epochs=1, schedule="constant"),
                     out=None, save=ck)
    resumed = recipe.run_training(dataclasses.replace(TINY_CFG, epochs=2, schedule="constant"),
                               out=None, resume=ck)
    assert resumed.step.t == full.step.t
    for k in full.params:
        np.testing.assert_allclose(resumed.params[k], full.params[k], rtol=0, atol=1e-6)
    for k in full.state["momentum"]:
        np.testing.assert_allclose(resumed.state["momentum"][k], full.state["momentum"][k],
                                   rtol=0, atol=1e-6)
    assert resumed.metrics["test_accuracy"] == full.metrics["test_accuracy"]


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    # Cosine schedule over the whole run: Ctrl-C after epoch 1, then --resume.
    cfg = dataclasses.replace(TINY_CFG, epochs=2)
    full = recipe.run_training(cfg, out=None)
    ck = tmp_path / "ck.npz"

    def ctrl_c(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(recipe.TrainingInterrupted) as info:
        recipe.run_training(cfg, out=None, save=ck, on_epoch_end=ctrl_c)
    assert info.value.saved_epoch == 1
    assert checkpoint_io.load(ck)[2]["epoch"] == 1
    resumed = recipe.run_training(cfg, out=None, resume=ck)
    for k in full.params:
        np.testing.assert_allclose(resumed.params[k], full.params[k], rtol=0, atol=1e-6)
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], abs=1e-6)


# ------------------------------------------------------------------------- the CLI


def run_cli(capsys, *argv):
    code = cli.main(["train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def digits_run():
    """`jitgrad train --epochs 2 --json` on the bundled digits (tiny model), run once."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["train", "--epochs", "2", "--json", *TINY])
    return code, buf.getvalue()


def test_cli_train_json(digits_run):
    code, out = digits_run
    assert code == 0
    lines = out.strip().splitlines()
    m = json.loads(lines[-1])
    for key in ("test_accuracy", "train_loss", "epochs", "step_time_s", "compile_time_s",
                "planned_peak_bytes"):
        assert key in m, key
    assert 0.7 <= m["test_accuracy"] <= 1.0  # tiny model, 2 epochs
    assert m["epochs"] == 2 and m["steps"] == 2 * (1438 // 64)
    assert m["planned_peak_bytes"] > 0 and m["step_time_s"] > 0 and m["compile_time_s"] > 0
    assert m["train_loss"] < 1.0
    assert sum(line.startswith("epoch ") for line in lines) == 2  # per-epoch lines
    assert any(line.startswith("test accuracy") for line in lines)  # summary


def test_cli_same_seed_same_result(digits_run, capsys):
    code, out, _ = run_cli(capsys, "--epochs", "2", "--json", "--quiet", *TINY)
    assert code == 0
    assert len(out.strip().splitlines()) == 3  # quiet: summary (2 lines) + JSON
    a, b = json.loads(digits_run[1].strip().splitlines()[-1]), json.loads(out.splitlines()[-1])
    for key in ("test_accuracy", "train_loss", "test_loss"):
        assert a[key] == b[key]


def test_cli_save_and_resume(tmp_path, capsys):
    ck = tmp_path / "run.npz"
    code, _, _ = run_cli(capsys, "--epochs", "1", "--schedule", "constant", "--quiet",
                         "--save", str(ck), *TINY)
    assert code == 0 and ck.exists()
    # Settings come from the checkpoint; --epochs is the new total.
    code, out, _ = run_cli(capsys, "--epochs", "2", "--resume", str(ck), "--json", "--quiet")
    assert code == 0
    m = json.loads(out.splitlines()[-1])
    assert m["sizes"] == [64, 16, 10] and m["steps"] == 2 * (1438 // 64)
    # A checkpoint that does not fit the model is refused with a clear message.
    code, _, err = run_cli(capsys, "--resume", str(ck), "--hidden", "8", "--quiet")
    assert code == 2
    assert "does not match the model" in err and "W0" in err
    assert len(err.strip().splitlines()) == 1


def assert_usage_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_cli_missing_data(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, _, err = run_cli(capsys, "--data", str(missing), "--epochs", "1")
    assert_usage_error(code, err, str(missing))


def test_cli_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "--resume", str(bad))
    assert_usage_error(code, err, "corrupt")
    code, _, err = run_cli(capsys, "--resume", str(tmp_path / "none.npz"))
    assert_usage_error(code, err, "does not exist")


IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[arr.dtype], arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_mnist_like(d: Path, n_train=200, n_test=50, labels_train=None, labels_test=None,
                     images_test=None):
    rng = np.random.default_rng(0)
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte.gz",
              rng.integers(0, 256, (n_train, 8, 8)).astype(np.uint8))
    write_idx(d / "train-labels-idx1-ubyte",
              labels_train if labels_train is not None else (np.arange(n_train) % 10)
              .astype(np.uint8))
    write_idx(d / "t10k-images-idx3-ubyte", images_test if images_test is not None
              else rng.integers(0, 256, (n_test, 8, 8)).astype(np.uint8))
    write_idx(d / "t10k-labels-idx1-ubyte",
              labels_test if labels_test is not None else (np.arange(n_test) % 10)
              .astype(np.uint8))
    return d


def test_cli_trains_on_idx_dir(tmp_path, capsys):
    d = write_mnist_like(tmp_path / "mnist")
    code, out, err = run_cli(capsys, "--data", str(d), "--epochs", "1", "--json", "--quiet",
                             *TINY)
    assert code == 0, err
    m = json.loads(out.splitlines()[-1])
    assert m["n_train"] == 200 and m["n_test"] == 50 and m["sizes"] == [64, 16, 10]


def test_cli_idx_wrong_shapes(tmp_path, capsys):
    d = write_mnist_like(tmp_path / "mnist", labels_test=np.zeros(49, np.uint8))
    code, _, err = run_cli(capsys, "--data", str(d), "--epochs", "1", *TINY)
    assert_usage_error(code, err, "50 images", "49 labels")


def test_cli_idx_feature_mismatch(tmp_path, capsys):
    d = write_mnist_like(tmp_path / "mnist", images_test=np.zeros((50, 7, 7), np.uint8))
    code, _, err = run_cli(capsys, "--data", str(d), "--epochs", "1", *TINY)
    assert_usage_error(code, err, "64 pixels", "49")


def test_cli_negative_label(tmp_path, capsys):
    labels = (np.arange(200) % 10).astype(np.int8)
    labels[17] = -3
    d = write_mnist_like(tmp_path / "mnist", labels_train=labels)
    code, _, err = run_cli(capsys, "--data", str(d), "--epochs", "1", *TINY)
    assert_usage_error(code, err, "label -3 at index 17")


def test_cli_test_label_out_of_range(tmp_path, capsys):
    labels = (np.arange(50) % 10).astype(np.uint8)
    labels[5] = 42
    d = write_mnist_like(tmp_path / "mnist", labels_test=labels)
    code, _, err = run_cli(capsys, "--data", str(d), "--epochs", "1", *TINY)
    assert_usage_error(code, err, "test label 42 at index 5", "out of range")


def test_cli_bad_csv(tmp_path, capsys):
    f = tmp_path / "d.csv"
    f.write_text("1,2,0\n3,4,1.5\n")
    code, _, err = run_cli(capsys, "--data", str(f), "--epochs", "1")
    assert_usage_error(code, err, "not an integer")


def test_cli_bad_flags(capsys):
    code, _, err = run_cli(capsys, "--hidden", "12,x")
    assert code == 2 and "hidden" in err
    code, _, err = run_cli(capsys, "--lr", "-1", "--epochs", "1", *TINY)
    assert_usage_error(code, err, "--lr must be positive")
    code, _, err = run_cli(capsys, "--batch-size", "100000", "--epochs", "1", "--hidden", "16")
    assert_usage_error(code, err, "larger than the training set")


def test_cli_remat_is_passed_through(capsys, monkeypatch):
    seen = {}
    real = recipe.train_step

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(recipe, "train_step", spy)
    code, out, _ = run_cli(capsys, "--remat", "--epochs", "1", "--json", *TINY)
    assert code == 0 and seen == {"remat": "sqrt"}
    seen.clear()
    # A budget no plan can meet: a clean message naming the smallest one, exit 2.
    code, _, err = run_cli(capsys, "--memory-budget", "1k", "--epochs", "1", "--quiet", *TINY)
    assert seen == {"memory_budget": 1000}
    assert_usage_error(code, err)
    assert "cannot be met: the smallest arena" in err
    # at this size recomputation cannot shrink the arena, and the message says so exactly
    assert "(storing all 2 values saved for backward and recomputing none)" in err


def test_cli_nonfinite_loss_stops_cleanly(tmp_path, capsys):
    ck = tmp_path / "ck.npz"
    code, _, err = run_cli(capsys, "--lr", "1e30", "--schedule", "constant", "--epochs", "1",
                           "--quiet", "--save", str(ck), *TINY)
    assert code == 1
    assert "non-finite training loss" in err and "epoch 1, step" in err
    assert "nothing was saved" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temp file


def test_cli_help_and_no_command(capsys):
    assert cli.main(["train", "--help"]) == 0
    assert "--memory-budget" in capsys.readouterr().out
    assert cli.main([]) == 2


def test_the_optimizer_comes_from_optim_optimizers():
    assert list(recipe.OPTIMIZER_DEFAULTS) == list(jg.optim.OPTIMIZERS)
    for name, cls in jg.optim.OPTIMIZERS.items():
        opt = recipe.make_optimizer(recipe.TrainConfig(optimizer=name).resolved(), 30)
        assert type(opt) is cls and opt.lr == recipe.OPTIMIZER_DEFAULTS[name]["lr"]
        assert opt.weight_decay == recipe.OPTIMIZER_DEFAULTS[name]["weight_decay"]
    sgd = recipe.make_optimizer(recipe.TrainConfig(momentum=0.5).resolved(), 30)
    assert (sgd.momentum, sgd.nesterov) == (0.5, True)
    plain = recipe.make_optimizer(recipe.TrainConfig(momentum=0.0).resolved(), 30)
    assert (plain.momentum, plain.nesterov) == (0.0, False)
    assert recipe.OPTIMIZER_DEFAULTS["adamw"] == {"lr": 1e-3, "weight_decay": 1e-2}


def test_parse_bytes():
    assert options.parse_bytes("4096") == 4096
    assert options.parse_bytes("1.5MiB") == int(1.5 * 2**20)
    assert options.parse_bytes("2k") == 2000
