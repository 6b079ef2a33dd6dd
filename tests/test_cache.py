"""The on-disk cache: concurrent writers, corrupted files, permissions, `jitgrad cache`.

Most tests load a tiny hand-written cfunc module through cache.load_module in a
fresh cache directory (a compile of ~0.2 s); the multi-process test runs the
whole pipeline in fresh processes, with the kernel library copied in from the
session's cache so that no child compiles it.
"""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

import jitgrad as jg
from jitgrad import cache, cli, kernels

SOURCE = textwrap.dedent("""
    from numba import cfunc, types

    @cfunc(types.float64(types.float64), cache=True)
    def jg_scale(x):
        return x * {c} + 1.0
""")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("JITGRAD_CACHE_DIR", str(path))
    return path


def fresh_source():
    """A module no cache has seen (a new constant), so that the first load compiles."""
    c = 1.0 + uuid.uuid4().int % 1000 / 1000
    return SOURCE.format(c=repr(c)), c


def load(source):
    """Load `source` as a new process would: not from this process's sys.modules."""
    name = f"jg_test_{cache.module_key(source)}"
    sys.modules.pop(name, None)
    try:
        return cache.load_module("test", source)
    finally:
        sys.modules.pop(name, None)


def numba_files(cache_dir, suffix):
    return sorted((cache_dir / "__pycache__").glob(f"jg_test_*{suffix}"))


def test_directory_and_files_are_private(cache_dir):
    source, c = fresh_source()
    mod = load(source)
    assert mod.jg_scale.ctypes(2.0) == 2.0 * c + 1.0
    assert stat.S_IMODE(os.stat(cache_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cache_dir / "__pycache__").st_mode) == 0o700
    files = list(cache_dir.glob("jg_test_*.py")) + numba_files(cache_dir, "")
    assert len(files) == 3  # the module, Numba's index and one data file
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) & 0o077 == 0, f
    again = load(source)  # a second "process" loads the machine code from the cache
    assert again.jg_scale._cache_hits == 1
    assert again.jg_scale.ctypes(3.0) == 3.0 * c + 1.0


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
@pytest.mark.parametrize("target", ["module", "index", "data"])
def test_corrupted_files_are_detected_and_rebuilt(cache_dir, target, damage, caplog):
    source, c = fresh_source()
    load(source)
    path = {"module": lambda: next(cache_dir.glob("jg_test_*.py")),
            "index": lambda: numba_files(cache_dir, ".nbi")[0],
            "data": lambda: numba_files(cache_dir, ".nbc")[0]}[target]()
    blob = path.read_bytes()
    if damage == "truncate":
        blob = blob[:len(blob) // 2]
    elif damage == "garble":  # flip bytes in the middle: the length stays right
        mid = len(blob) // 2
        blob = blob[:mid] + bytes(b ^ 0x5A for b in blob[mid:mid + 16]) + blob[mid + 16:]
    else:
        blob = b""
    path.write_bytes(blob)
    mod = load(source)
    assert mod.jg_scale.ctypes(2.0) == 2.0 * c + 1.0
    if target == "module":  # republished byte for byte; its compiled code is still valid
        assert path.read_text() == source
    else:  # recompiled, not loaded from the damaged file
        assert mod.jg_scale._cache_hits == 0
    assert "rebuilding" in caplog.text and path.name in caplog.text
    caplog.clear()
    again = load(source)  # and the rebuilt files are good again
    assert again.jg_scale._cache_hits == 1 and "rebuilding" not in caplog.text


def test_numba_files_of_another_format_are_a_miss(cache_dir):
    """An index or data file written without jitgrad's seal (e.g. by plain Numba)."""
    source, c = fresh_source()
    load(source)
    for f in numba_files(cache_dir, ".nb?"):
        f.write_bytes(b"\x80\x04\x95garbage that unpickles to nothing")
    assert len(numba_files(cache_dir, ".nb?")) == 2
    mod = load(source)
    assert mod.jg_scale.ctypes(1.0) == c + 1.0 and mod.jg_scale._cache_hits == 0


@pytest.mark.parametrize("where", ["directory", "module", "pycache", "index", "data"])
@pytest.mark.parametrize("bits", [stat.S_IWGRP, stat.S_IWOTH])
def test_writable_by_others_is_refused(cache_dir, where, bits):
    source, _ = fresh_source()
    load(source)
    path = {"directory": cache_dir,
            "module": next(cache_dir.glob("jg_test_*.py")),
            "pycache": cache_dir / "__pycache__",
            "index": numba_files(cache_dir, ".nbi")[0],
            "data": numba_files(cache_dir, ".nbc")[0]}[where]
    os.chmod(path, os.stat(path).st_mode | bits)
    with pytest.raises(jg.CacheSecurityError) as info:
        load(source)
    msg = str(info.value)
    assert str(path) in msg and "writable by group or others" in msg
    assert "chmod go-w" in msg and "inject" in msg
    assert isinstance(info.value, jg.JitgradError)
    os.chmod(path, os.stat(path).st_mode & ~bits)  # fixed: loads again
    assert load(source).jg_scale._cache_hits == 1


def test_directory_owned_by_someone_else_is_refused(cache_dir, monkeypatch):
    source, _ = fresh_source()
    load(source)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(cache_dir).st_uid + 1)
    with pytest.raises(jg.CacheSecurityError, match=r"owned by uid \d+, not by you"):
        load(source)


def test_cli_cache_info_and_clear(cache_dir, capsys):
    (cache_dir.parent / "keep").mkdir()
    os.makedirs(cache_dir, mode=0o700)
    (cache_dir / "notes.txt").write_text("not jitgrad's")
    source, _ = fresh_source()
    load(source)
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(cache_dir) in out and "modules: 1" in out and "numba files: 2" in out
    assert "permissions: ok" in out

    os.chmod(cache_dir, 0o770)
    assert cli.main(["cache", "info"]) == 1
    out = capsys.readouterr().out
    assert "writable by group or others" in out and "chmod go-w" in out
    os.chmod(cache_dir, 0o700)

    assert cli.main(["cache", "clear"]) == 0
    out = capsys.readouterr().out
    assert "removed 4 files" in out  # module, index, data, index lock
    assert sorted(os.listdir(cache_dir)) == ["notes.txt"]  # nothing else is touched
    assert cli.main(["cache", "info"]) == 0
    assert "modules: 0" in capsys.readouterr().out


# ---------------------------------------------------------------- several processes at once

_CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np, jitgrad as jg
    ready, go, c = sys.argv[1], sys.argv[2], float(sys.argv[3])
    from jitgrad import kernels
    kernels.ensure_loaded()          # from the copied library: no compile
    open(ready, "w").close()
    while not os.path.exists(go):    # start compiling together
        time.sleep(0.005)
    f = jg.jit(lambda x, y: jg.sum(jg.tanh(x @ y) * c), backend="numba")
    x = np.arange(12.0).reshape(3, 4) / 10
    print(repr(float(f(x, x.T))))
""")


def test_processes_compiling_the_same_program_at_once(tmp_path):
    kernels.ensure_loaded()  # into the session's cache; copied into the fresh one below
    cache_dir = tmp_path / "cache"
    os.makedirs(cache_dir, mode=0o700)
    (cache_dir / "__pycache__").mkdir(mode=0o700)
    session = os.path.dirname(sys.modules[next(n for n in sys.modules
                                               if n.startswith("jg_kernels_"))].__file__)
    for sub in ("", "__pycache__"):
        for name in os.listdir(os.path.join(session, sub)):
            if name.startswith("jg_kernels_") and not name.endswith(".lock"):
                shutil.copy2(os.path.join(session, sub, name), cache_dir / sub / name)
    c = 1.0 + uuid.uuid4().int % 1000 / 1000  # a program no cache has seen
    go = tmp_path / "go"
    env = {**os.environ, "JITGRAD_CACHE_DIR": str(cache_dir), "JITGRAD_NUM_THREADS": "1"}
    n = 4
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / f"ready{i}"),
                                  str(go), repr(c)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(n)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
        assert all(p.poll() is None for p in children), [p.communicate() for p in children]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    go.touch()
    x = np.arange(12.0).reshape(3, 4) / 10
    want = np.sum(np.tanh(x @ x.T) * c)
    for p in children:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert float(out.strip().splitlines()[-1]) == pytest.approx(want, rel=1e-12), err
        assert "rebuilding" not in err  # nobody ever saw a half-written file
    # and a later process loads everything the racers wrote
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "r"), str(go), repr(c)],
                          env={**env, "NUMBA_DEBUG_CACHE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "data saved" not in done.stdout and "data loaded" in done.stdout
    assert float(done.stdout.strip().splitlines()[-1]) == pytest.approx(want, rel=1e-12)
