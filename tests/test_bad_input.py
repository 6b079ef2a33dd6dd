"""Bad input gets one line naming the problem (exit code 2 from the CLI), never a traceback.

Checkpoints for `jitgrad train --resume` broken every way a file can be, data files, flags,
`jitgrad show` scripts and argument specs, `memsweep` output paths; dtypes and primitives the
backends cannot run; and JITGRAD_NUM_THREADS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jitgrad as jg
from jitgrad import errors
from jitgrad.compiler import threads
from jitgrad.frontend import ir
from jitgrad.tools import cli
from jitgrad.training import checkpoint_io, nn, recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--hidden", "16", "--batch-size", "64"]


def run(capsys, *argv):
    """`jitgrad ARGV` in this process: (exit code, stdout, stderr)."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == cli.EXIT_USAGE, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------- --resume checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """A checkpoint as `jitgrad train --save` writes it for the TINY model (nothing trained)."""
    cfg = recipe.TrainConfig(hidden=(16,), batch_size=64, epochs=1).resolved()
    params = nn.mlp_init([64, 16, 10], np.random.default_rng(0), np.float32)
    state = recipe.make_optimizer(cfg, 22).init(params)
    meta = {"epoch": 1, "step": 22, "config": cfg.to_json(), "dataset": "digits",
            "sizes": [64, 16, 10]}
    path = tmp_path_factory.mktemp("ck") / "good.npz"
    checkpoint_io.save(path, params, state, meta)
    return path


def _arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _with(path, dst, **changes):
    """A copy of checkpoint `path` with some entries replaced (header: a JSON string)."""
    arrays = _arrays(path)
    for k, v in changes.items():
        arrays[k.replace("__", "/") if k != "__meta__" else k] = v
    np.savez(dst, **arrays)
    return dst


def _header(path, edit):
    header = json.loads(str(_arrays(path)["__meta__"]))
    return np.array(edit(header) if callable(edit) else edit)


def _nested_json(depth):
    return "[" * depth + "]" * depth


def _deep_structure(depth):
    spec = '"leaf"'
    for _ in range(depth):
        spec = '{"list": [' + spec + ']}'
    return spec


def _meta(**changes):
    def edit(h):
        h["meta"].update(changes)
        return json.dumps(h)
    return edit


BAD_CHECKPOINTS = {
    # name: (make(good, dst) -> path, phrase the message must contain)
    "missing": (lambda g, d: d, "does not exist"),
    "directory": (lambda g, d: (d.mkdir(), d)[1], "is not a file"),
    "garbage bytes": (lambda g, d: (d.write_bytes(os.urandom(4000)), d)[1],
                      "is not an .npz archive"),
    "truncated": (lambda g, d: (d.write_bytes(g.read_bytes()[:5000]), d)[1], "is corrupt"),
    "a .npy file": (lambda g, d: (np.save(d.with_suffix(".npy"), np.ones(3)),
                                  d.with_suffix(".npy"))[1], "is a single .npy array"),
    "another .npz": (lambda g, d: (np.savez(d, x=np.ones(3)), d)[1], "not a jitgrad checkpoint"),
    "deeply nested metadata": (
        lambda g, d: _with(g, d, __meta__=_header(
            g, lambda h: json.dumps(h)[:-1] + ', "x": ' + _nested_json(100_000) + "}")),
        "nests too deeply"),
    "deeply nested structure": (
        lambda g, d: _with(g, d, __meta__=_header(g, lambda h: json.dumps(h).replace(
            '"params": {"dict"', '"params": ' + _deep_structure(450) + ', "p": {"dict"'))),
        "more than 64 levels deep"),
    "metadata not an object": (
        lambda g, d: _with(g, d, __meta__=_header(g, lambda h: json.dumps({**h, "meta": [1]}))),
        "metadata is a list"),
    "header not a string": (lambda g, d: _with(g, d, __meta__=np.ones(3)), "not a JSON string"),
    "structure missing": (
        lambda g, d: _with(g, d, __meta__=_header(g, lambda h: json.dumps(
            {**h, "structure": "leaf"}))), "no params/state structure"),
    "epoch infinite": (
        lambda g, d: _with(g, d, __meta__=_header(g, lambda h: json.dumps(h).replace(
            '"epoch": 1', '"epoch": Infinity'))), "epoch=inf"),
    "epoch negative": (lambda g, d: _with(g, d, __meta__=_header(g, _meta(epoch=-5))),
                       "epoch=-5"),
    "config not an object": (lambda g, d: _with(g, d, __meta__=_header(g, _meta(config=[1]))),
                             "invalid training config"),
    "config field of the wrong type": (
        lambda g, d: _with(g, d, __meta__=_header(g, _meta(config={"hidden": "abc"}))),
        "config field 'hidden' is 'abc'"),
    "wrong shape": (lambda g, d: _with(g, d, params__W0=np.ones((3, 16), np.float32)),
                    "params/W0 has shape (3, 16), the model needs (64, 16)"),
    "wrong dtype": (lambda g, d: _with(g, d, params__W0=np.ones((64, 16), np.float64)),
                    "params/W0 has dtype float64, the model needs float32"),
    "strings": (lambda g, d: _with(g, d, params__W0=np.array(["a", "b"])), "dtype <U1"),
    "NaN parameters": (lambda g, d: _with(g, d, params__W0=np.full((64, 16), np.nan,
                                                                   np.float32)),
                       "holds NaN or infinity in params/W0"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_resume_refuses_a_bad_checkpoint_in_one_line(good_checkpoint, tmp_path, capsys, case):
    make, phrase = BAD_CHECKPOINTS[case]
    path = make(good_checkpoint, tmp_path / "bad.npz")
    code, _, err = run(capsys, "train", "--resume", str(path), "--epochs", "1", "--quiet")
    assert_one_line_error(code, err, f"checkpoint {str(path)!r}", phrase)


def test_the_good_checkpoint_resumes(good_checkpoint, capsys):
    code, out, err = run(capsys, "train", "--resume", str(good_checkpoint), "--epochs", "1",
                         "--json", "--quiet")
    assert code == cli.EXIT_OK, err
    assert json.loads(out.splitlines()[-1])["sizes"] == [64, 16, 10]


def test_checkpoint_trees_nest_at_most_max_depth(tmp_path):
    deep = np.ones(2)
    for _ in range(checkpoint_io.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(checkpoint_io.CheckpointError, match="more than 64 levels deep"):
        checkpoint_io.save(tmp_path / "x.npz", {"w": deep}, {})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- data files and flags


@pytest.mark.parametrize("name, content, phrase", [
    ("trunc.npz", lambda: b"PK\x03\x04" + os.urandom(200), "is corrupt"),
    ("bytes.npz", lambda: os.urandom(300), "is not an .npz archive"),
    ("bin.csv", lambda: b"1,2,0\n\xff\xfe\x00\x88", "not a CSV text file"),
])
def test_broken_data_files_are_named(tmp_path, capsys, name, content, phrase):
    path = tmp_path / name
    path.write_bytes(content())
    code, _, err = run(capsys, "train", "--data", str(path), "--epochs", "1", *TINY)
    assert_one_line_error(code, err, name, phrase)


def test_data_with_no_rows_and_labels_that_make_too_many_classes(tmp_path, capsys):
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.ones((0, 3)), y=np.zeros(0, np.int64))
    code, _, err = run(capsys, "train", "--data", str(empty), "--epochs", "1", *TINY)
    assert_one_line_error(code, err, "empty.npz", "no examples")
    # One label of 10**12 asked for a 29 TiB output layer (a MemoryError traceback).
    huge = tmp_path / "huge.npz"
    np.savez(huge, x=np.ones((80, 3)), y=np.r_[np.arange(79) % 2, 10**12])
    code, _, err = run(capsys, "train", "--data", str(huge), "--epochs", "1", "--hidden", "4",
                       "--batch-size", "4")
    assert_one_line_error(code, err, "huge", "the largest label, 1000000000000")


@pytest.mark.parametrize("argv, phrase", [
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--remat", "bogus"], "remat='bogus'"),
    (["--lr", "-1"], "--lr must be positive"),
])
def test_bad_training_values_name_the_flag(capsys, argv, phrase):
    code, _, err = run(capsys, "train", "--epochs", "1", *TINY, *argv)
    assert_one_line_error(code, err, phrase)


@pytest.mark.parametrize("where", ["missing directory", "a directory", "empty"])
def test_an_unwritable_save_path_is_refused_before_training(tmp_path, capsys, monkeypatch,
                                                            where):
    path = {"missing directory": str(tmp_path / "nope" / "ck.npz"), "a directory": str(tmp_path),
            "empty": ""}[where]

    def no_training(*args, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(recipe, "run_training", no_training)
    code, _, err = run(capsys, "train", "--save", path)
    assert code == cli.EXIT_USAGE and "Traceback" not in err
    assert "argument --save" in err.strip().splitlines()[-1]


def test_a_model_too_big_for_memory_is_one_line(capsys, monkeypatch):
    def too_big(*args, **kw):
        raise MemoryError("Unable to allocate 47.7 GiB for an array with shape (64, 100000000)")

    monkeypatch.setattr(jg.nn, "mlp_init", too_big)  # models.MODELS["mlp"] calls it
    code, _, err = run(capsys, "train", "--hidden", "100000000", "--epochs", "1")
    assert_one_line_error(code, err, "out of memory", "47.7 GiB")


def test_memsweep_refuses_output_paths_before_the_sweep(tmp_path, capsys, monkeypatch):
    from jitgrad.tools import memsweep

    def no_sweep(*args, **kw):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(memsweep, "sweep", no_sweep)
    for flag in ("--csv", "--plot", "--timeline"):
        code, _, err = run(capsys, "memsweep", "--depth", "2", "--width", "8", "--batch", "4",
                           flag, str(tmp_path / "nope" / "out.png"))
        assert code == cli.EXIT_USAGE and "Traceback" not in err, err
        assert f"argument {flag}" in err and "does not exist" in err


# ------------------------------------------------------------------- jitgrad show


@pytest.fixture
def scripts(tmp_path):
    def write(name, body):
        path = tmp_path / name
        path.write_text(textwrap.dedent(body))
        return str(path)
    return write


def test_show_with_the_wrong_number_of_arguments(scripts, capsys):
    s = scripts("m.py", "def loss(w, x):\n    return (x @ w).sum()\n")
    code, _, err = run(capsys, "show", f"{s}:loss", "--arg", "f32[3,2]")
    assert_one_line_error(code, err, "loss cannot be called with the 1 example argument",
                          "'x'")
    code, _, err = run(capsys, "show", f"{s}:loss", "--arg", "f32[3,2]", "--arg", "f32[4,3]",
                       "--wrt", "5")
    line = assert_one_line_error(code, err, "--wrt 5", "takes 2 argument(s)")
    assert "<unknown>" not in line


@pytest.mark.parametrize("body, phrase, line", [
    ("def f(x):\n    raise RuntimeError('boom')\n", "RuntimeError: boom", 2),
    ("def f(x):\n    return f(x)\n", "RecursionError", 2),
    ("import sys\nsys.exit(3)\n", "exit(3)", 2),
    ("def f(x):\n    return x\n__jitgrad_example__ = lambda: 1 / 0\n", "ZeroDivisionError", 3),
])
def test_show_reports_the_scripts_own_exceptions_with_its_line(scripts, capsys, body, phrase,
                                                               line):
    s = scripts("user.py", body)
    code, _, err = run(capsys, "show", f"{s}:f", "--arg", "f32[2]")
    assert_one_line_error(code, err, phrase, f"(at {s}:{line})")


def test_show_flags_are_checked(scripts, capsys, tmp_path):
    s = scripts("m.py", "def f(x):\n    return x * 2\n")
    code, _, err = run(capsys, "show", f"{s}:f", "--arg", "f32[2]", "--max-nodes", "0")
    assert code == cli.EXIT_USAGE and "argument --max-nodes" in err
    code, _, err = run(capsys, "show", f"{s}:f", "--arg", "f32[2]", "--png",
                       str(tmp_path / "nope" / "g.png"))
    assert code == cli.EXIT_USAGE and "g.png" in err and "does not exist" in err


def test_arg_specs_take_no_memory():
    from jitgrad.tools.show import parse_arg_spec
    a = parse_arg_spec("f32[100000,100000]")  # 40 GB if it were allocated
    assert a.shape == (100000, 100000) and a.dtype == np.float32 and a.strides == (0, 0)
    with pytest.raises(jg.JitgradError, match="bad argument spec"):
        parse_arg_spec("f32[99999999999,99999999]")


def test_a_closed_stdout_ends_quietly(scripts, tmp_path):
    s = scripts("m.py", "def f(x):\n    return x * 2\n")
    read, write = os.pipe()
    os.close(read)  # every write of the child fails with EPIPE
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # (argparse itself ignores a failed write of --help: exit code 0)
    for argv, code in ((["show", f"{s}:f", "--arg", "f32[2]", "--all"], cli.EXIT_BROKEN_PIPE),
                       (["train", "--help"], 0)):
        proc = subprocess.run([sys.executable, "-m", "jitgrad", *argv], stdout=write,
                              stderr=subprocess.PIPE, env=env, timeout=300)
        assert proc.stderr == b"" and proc.returncode == code, proc.stderr
    os.close(write)


# ------------------------------------------------------------------- dtypes and primitives


# What programs may hold on every backend (ir.SUPPORTED_DTYPES), and what they may not.
SUPPORTED = [np.dtype(d) for d in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                   np.uint16, np.uint32, np.uint64, np.float32, np.float64)]
UNSUPPORTED = [np.dtype(d) for d in (np.float16, np.longdouble, np.complex64, np.complex128)
               if np.dtype(d) not in SUPPORTED]  # long double is float64 on some platforms


@pytest.mark.parametrize("dtype", UNSUPPORTED, ids=lambda d: d.name)
def test_unsupported_dtypes_are_refused_alike_by_every_backend(backend, dtype):
    listed = "float32, float64"

    def as_argument():
        return jg.jit(lambda a: jg.sum(jg.tanh(a) * 2))(np.ones(3, dtype))

    def as_constant():  # int8 * c is of c's dtype, as in numpy
        c = np.ones(3, dtype)
        return jg.jit(lambda a: a * c)(np.ones(3, np.int8))

    def as_cast():
        return jg.jit(lambda a: a.astype(dtype))(np.ones(3, np.float32))

    for how in (as_argument, as_constant, as_cast):
        with pytest.raises(jg.JitgradError) as info:
            how()
        msg = str(info.value)
        assert dtype.name in msg and listed in msg and "test_bad_input.py:" in msg


def test_the_dtype_list_is_one_list():
    assert list(ir.SUPPORTED_DTYPES) == SUPPORTED
    assert ir.check_dtype(np.dtype(">f4")) == np.float32  # another byte order is converted
    assert jg.jit(lambda a: a * 2)(np.arange(3, dtype=">f4")).tolist() == [0, 2, 4]


def test_the_dtype_names_are_one_table():
    # ir.dtype_short names a dtype everywhere: the IR printer, kernel symbols, --arg specs
    from jitgrad.compiler import kernels
    from jitgrad.tools.show import parse_arg_spec
    names = [ir.dtype_short(d) for d in SUPPORTED]
    assert names == ["bool", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64", "f32", "f64"]
    for d, name in zip(SUPPORTED, names, strict=True):
        assert ir.dtype_named(name) == d and ir.dtype_named(d.name) == d
        assert parse_arg_spec(f"{name}[2]").dtype == d
        assert ir.Var((2,), d).type_str() == f"{name}[2]"
    assert ir.dtype_named("float16") is None and ir.dtype_named("f16") is None
    assert kernels.FLOATS == {"f32": "np.float32", "f64": "np.float64"}
    assert kernels.ITEM_SIZES == {"b1": "np.uint8", "b2": "np.uint16", "b4": "np.uint32",
                                  "b8": "np.uint64"}
    with pytest.raises(jg.JitgradError, match="dtypes: bool i8 .* f64"):
        parse_arg_spec("f16[2]")


def _every_kind_of_op(a, idx, cols):
    return (jg.transpose(a), a[1:, ::2], jg.reshape(a, (-1,)), jg.concatenate([a, a], axis=1),
            a[idx], jg.take_along_axis(a, cols, axis=1),
            jg.sum(a), jg.sum(a, axis=0), jg.sum(a, axis=1), jg.max(a, axis=0),
            jg.argmax(a, axis=1), *jg.max_argmax(a, axis=0), jg.maximum(a, a[::-1]),
            jg.where(a > a[::-1], a, a[::-1]), a == a[::-1], a.astype(np.float64))


@pytest.mark.parametrize("dtype", SUPPORTED, ids=lambda d: d.name)
def test_every_supported_dtype_runs_the_same_on_both_backends(dtype):
    # Numba used to read int32/int16/bool reductions through the float64 kernel (wrong
    # sums and maxima) and had no kernels for 2-byte items (a segfault).
    rng = np.random.default_rng(0)
    if dtype.kind == "b":
        a = rng.random((4, 3)) > 0.5
    elif dtype.kind == "f":
        a = rng.standard_normal((4, 3)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, (4, 3), dtype=dtype, endpoint=True)
    idx, cols = np.array([3, 0, 2, 2]), np.array([[2], [0], [1], [1]])
    want = jg.jit(_every_kind_of_op, backend="interpret")(a, idx, cols)
    got = jg.jit(_every_kind_of_op, backend="numba")(a, idx, cols)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype, k
        if dtype.kind == "f" and w.dtype.kind == "f":
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=str(k))
        else:
            np.testing.assert_array_equal(g, w, err_msg=str(k))


@pytest.fixture
def doubling_primitive():
    """make(family): a primitive computing 2x with a numpy rule and no Numba lowering,
    taken out of the primitive registry again after the test."""
    from jitgrad.frontend.core import primitive, registry
    made = []

    def make(family):
        p = primitive(f"test_double_{family}", family)
        p.def_impl(lambda x: 2 * x)
        p.def_shape(lambda x: x)
        made.append(p.name)
        return p

    yield make
    for name in made:
        registry.pop(name)


@pytest.mark.parametrize("family, fused", [("elementwise", False), ("elementwise", True),
                                           ("reduce", False)])
def test_a_primitive_without_numba_lowering_is_named_before_compiling(monkeypatch, family,
                                                                      fused, doubling_primitive):
    from jitgrad.compiler import backend
    double = doubling_primitive(family)

    def f(x):
        y = double.bind(x)
        return y + 1.0 if fused else y

    x = np.arange(3.0)
    np.testing.assert_array_equal(jg.jit(f, backend="interpret")(x), 2 * x + (1 if fused else 0))

    def no_compiling(*args, **kw):
        raise AssertionError("Numba compilation started")

    monkeypatch.setattr(backend.kernels, "ensure_loaded", no_compiling)
    monkeypatch.setattr(backend.cache, "load_module", no_compiling)
    with pytest.raises(jg.JitgradError) as info:
        jg.jit(f, backend="numba")(x)
    assert type(info.value).__name__ == "NoLoweringError"
    msg = str(info.value)
    assert f"test_double_{family} at " in msg and "no Numba lowering" in msg
    assert "test_bad_input.py:" in msg and "backend='interpret'" in msg


def test_a_kernel_without_the_dtype_is_named():
    from jitgrad.compiler import kernels
    with pytest.raises(errors.NoLoweringError, match="gemm kernel takes float32, float64, "
                                                     "not int64"):
        kernels.symbol("gemm", np.int64)
    assert kernels.symbol("sum", np.uint64) == "jg_sum_u64"


# ------------------------------------------------------------------- JITGRAD_NUM_THREADS


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5", "2x", "½"])
def test_bad_num_threads_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("JITGRAD_NUM_THREADS", value)
    with pytest.raises(jg.JitgradError) as info:
        threads.num_threads()
    msg = str(info.value)
    assert f"JITGRAD_NUM_THREADS={value!r}" in msg and "whole number of threads >= 1" in msg


def test_good_num_threads(monkeypatch):
    monkeypatch.setenv("JITGRAD_NUM_THREADS", " 3 ")
    assert threads.num_threads() == 3
    monkeypatch.setenv("JITGRAD_NUM_THREADS", "")
    assert threads.num_threads() >= 1


def test_bad_num_threads_from_the_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JITGRAD_NUM_THREADS="abc")
    proc = subprocess.run([sys.executable, "-m", "jitgrad", "train", "--epochs", "1",
                           "--quiet", *TINY], capture_output=True, text=True, env=env,
                          timeout=600)
    assert_one_line_error(proc.returncode, proc.stderr, "JITGRAD_NUM_THREADS='abc'")
