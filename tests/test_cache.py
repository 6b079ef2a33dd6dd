"""The on-disk cache: concurrent writers, corrupted files, permissions, `jitgrad cache`.

Most tests load a tiny hand-written cfunc module through cache.load_module in a
fresh cache directory (a compile of ~0.2 s); the multi-process tests run the
whole pipeline in fresh processes, with the kernel library copied in from the
session's cache so that no child compiles all of it. Another user is faked:
`foreign` makes chosen files look owned by another uid to every stat call (the
tests cannot chown without root).
"""

import hashlib
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import types
import uuid

import numpy as np
import pytest

import jitgrad as jg
from jitgrad.compiler import cache, kernels, trusted_dir
from jitgrad.tools import cli

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


FOREIGN_UID = 4242


def foreign(monkeypatch, paths, on_stat=None):
    """Make `paths` look owned by uid FOREIGN_UID to os.stat/lstat/fstat; `on_stat(st)` is
    called after every such call (a hook that can change the file system meanwhile)."""
    inodes = {(os.lstat(p).st_dev, os.lstat(p).st_ino) for p in paths}

    def wrap(real):
        def fake(*args, **kwargs):
            st = real(*args, **kwargs)
            if on_stat is not None:
                on_stat(st)
            if (st.st_dev, st.st_ino) not in inodes:
                return st
            fields = {k: getattr(st, k) for k in dir(st) if k.startswith("st_")}
            return types.SimpleNamespace(**{**fields, "st_uid": FOREIGN_UID})
        return fake
    for name in ("stat", "lstat", "fstat"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))


def package_numba_files():
    """Numba files under the installed jitgrad package, with their stamps."""
    root = os.path.dirname(jg.__file__)
    return {(d, f, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, fs in os.walk(root) for f in fs if f.endswith((".nbi", ".nbc"))}


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


def test_clear_removes_only_names_jitgrad_makes(cache_dir, capsys):
    """JITGRAD_CACHE_DIR may be a directory of the user's own: clear leaves their files."""
    pycache = cache_dir / "__pycache__"
    os.makedirs(pycache, mode=0o700)
    theirs = ["thesis.tmp", "data.tmp.bak", "tmpk2j3h4x9.tmp", "jg_notes.txt", "jg_plot.py",
              "jg_step_1234.py", "notes.py", "__pycache__/notes.cpython-311.pyc",
              "__pycache__/notes.f-3.py311.nbi", "__pycache__/notes.f-3.py311.1.nbc",
              "__pycache__/index.lock", "__pycache__/x.nbi.tmp.0123456789abcdef"]
    for name in theirs:
        (cache_dir / name).write_text("the user's")
    source, _ = fresh_source()
    load(source)
    (cache_dir / f"jg_tmp_{'0' * 16}.tmp").write_bytes(b"left by a killed process")
    assert cli.main(["cache", "clear"]) == 0
    assert "removed 5 files" in capsys.readouterr().out  # module, index, data, lock, temp
    left = {str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*") if p.is_file()}
    assert left == set(theirs)
    assert all((cache_dir / name).read_text() == "the user's" for name in theirs)


def test_trust_rule_for_each_component(monkeypatch):
    """Above the cache: yours or root's, not writable by others unless root's sticky /tmp.
    The cache directory and its files: yours alone."""
    monkeypatch.setattr(os, "getuid", lambda: 1000)

    def st(uid, mode):
        return types.SimpleNamespace(st_uid=uid, st_mode=mode)
    d, f, link = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
    ok_above = [st(0, d | 0o755), st(1000, d | 0o700), st(0, d | 0o1777), st(0, link | 0o777),
                st(1000, link | 0o777)]
    bad_above = [st(1000, d | 0o1777), st(0, d | 0o777), st(0, d | 0o775), st(1001, d | 0o755),
                 st(1001, link | 0o777), st(1001, d | 0o1777)]
    for s_ in ok_above:
        assert trusted_dir.problem(s_, "/p", "directory", private=False) is None, s_
    for s_ in bad_above:
        assert trusted_dir.problem(s_, "/p", "directory", private=False) is not None, s_
    assert trusted_dir.problem(st(1000, d | 0o700), "/p", "cache directory", private=True) is None
    assert trusted_dir.problem(st(1000, f | 0o600), "/p", "file", private=True) is None
    for s_ in [st(0, d | 0o700), st(0, d | 0o1777), st(1000, d | 0o1777), st(1000, f | 0o620),
               st(0, f | 0o600), st(1001, f | 0o600)]:
        assert trusted_dir.problem(s_, "/p", "cache directory", private=True) is not None, s_


def test_every_component_of_the_cache_path_is_checked(tmp_path, monkeypatch, capsys):
    shared, group = tmp_path / "shared", tmp_path / "shared" / "group"
    cache_dir = group / "cache"
    os.makedirs(cache_dir, mode=0o700)
    os.chmod(shared, 0o777)  # others could rename `group` away and put their own in its place
    os.chmod(group, 0o770)
    monkeypatch.setenv("JITGRAD_CACHE_DIR", str(cache_dir))
    source, c = fresh_source()
    with pytest.raises(jg.CacheSecurityError) as info:
        load(source)
    msg = str(info.value)
    assert f"directory above the cache directory {shared} is writable by group or others" in msg
    assert not list(cache_dir.iterdir())  # nothing was written through the unsafe path
    assert cli.main(["cache", "info"]) == 1
    out = capsys.readouterr().out
    assert f"{shared} is writable" in out and f"{group} is writable" in out  # every one
    os.chmod(shared, 0o755)
    os.chmod(group, 0o755)
    assert load(source).jg_scale.ctypes(2.0) == 2.0 * c + 1.0

    # A symlink on the path is followed only where the link passes the same test.
    link = tmp_path / "link"
    os.symlink(cache_dir, link)
    monkeypatch.setenv("JITGRAD_CACHE_DIR", str(link))
    assert load(source).jg_scale._cache_hits == 1
    assert cli.main(["cache", "info"]) == 0
    assert "permissions: ok" in capsys.readouterr().out
    foreign(monkeypatch, [link])
    with pytest.raises(jg.CacheSecurityError, match=f"symlink on the cache path {link} is "
                                                    f"owned by uid {FOREIGN_UID}"):
        load(source)
    assert cli.main(["cache", "info"]) == 1
    assert f"symlink on the cache path {link} is owned by uid" in capsys.readouterr().out


def test_a_temp_directory_is_trusted(monkeypatch):
    """Root's sticky /tmp is above every `mktemp -d` cache: it must pass."""
    path = tempfile.mkdtemp()
    try:
        monkeypatch.setenv("JITGRAD_CACHE_DIR", path)
        assert cache.info()["problems"] == []
        source, c = fresh_source()
        assert load(source).jg_scale.ctypes(1.0) == c + 1.0
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("flip", ["link on the cache path", "index file"])
def test_a_link_flipped_between_check_and_open_runs_nothing(tmp_path, monkeypatch, caplog,
                                                             flip):
    """An attacker who could swap a link between jitgrad's check of a file and its open must
    not get their pickle unpickled. The hook flips the link deterministically at the first
    moment jitgrad looks at the genuine index: right after a stat of it (a check that looks
    at the file by path, as d0d2227 did) or right before opening it by name. The attacker's
    directory and files are owned by another user (faked)."""
    real, evil, link = tmp_path / "real", tmp_path / "evil", tmp_path / "cache"
    os.makedirs(real, mode=0o700)
    os.symlink(real, link)
    monkeypatch.setenv("JITGRAD_CACHE_DIR", str(link))
    source, c = fresh_source()
    load(source)
    index = numba_files(real, ".nbi")[0]
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    payload = pickle.dumps(Payload())
    os.makedirs(evil / "__pycache__")
    bad = evil / "__pycache__" / index.name
    bad.write_bytes(cache._MAGIC + hashlib.sha256(payload).digest() + payload)
    genuine = (os.stat(index).st_dev, os.stat(index).st_ino)
    flipped = []

    def flip_now():
        if flipped:
            return
        flipped.append(True)
        if flip == "index file":
            tmp = index.with_suffix(".swap")
            os.symlink(bad, tmp)
            os.replace(tmp, index)
        else:
            os.symlink(evil, tmp_path / "swap")
            os.replace(tmp_path / "swap", link)

    def on_stat(st):
        if (st.st_dev, st.st_ino) == genuine:
            flip_now()
    foreign(monkeypatch, [evil, evil / "__pycache__", bad], on_stat)
    real_open = os.open

    def os_open(path, *args, **kwargs):
        if os.path.basename(os.fsdecode(path)) == index.name:
            flip_now()
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", os_open)
    try:
        mod = load(source)
    except jg.CacheSecurityError as e:
        mod = e
    assert flipped  # the hook did run between the check and the read
    assert not marker.exists(), "the attacker's pickle was unpickled"
    assert not isinstance(mod, Exception), mod
    assert mod.jg_scale.ctypes(2.0) == 2.0 * c + 1.0
    if flip == "link on the cache path":
        # the index and data were read through the descriptor of the directory checked
        # (the genuine one): a cache hit
        assert mod.jg_scale._cache_hits == 1
    else:  # opened with O_NOFOLLOW: the link is never followed, a miss that replaces it
        assert mod.jg_scale._cache_hits == 0 and "rebuilding" in caplog.text
        assert not index.is_symlink()


def test_load_module_names_are_the_names_clear_removes(cache_dir):
    """Every name load_module makes matches what `jitgrad cache clear` removes."""
    source, _ = fresh_source()
    sys.modules.pop(f"jg_kernel_2d_{cache.module_key(source)}", None)
    cache.load_module("kernel_2d", source)
    made = {p.name for p in cache_dir.rglob("*") if p.is_file()}
    assert len(made) == 4  # module, index, data, index lock
    assert all(cache._JITGRAD_NAME.fullmatch(n) for n in made), made
    for bad in ("Step", "a.b", "../x", ""):
        with pytest.raises(ValueError, match="prefix"):
            cache.load_module(bad, source)


def test_one_atomic_write_for_the_cache_and_checkpoints(tmp_path):
    from jitgrad.compiler.atomic_write import atomic_write
    target = tmp_path / "f"
    atomic_write(str(target), lambda f: f.write(b"first"))
    atomic_write(str(target), lambda f: f.write(b"same name, other bytes"), replace=False)
    assert target.read_bytes() == b"first"  # a published file is kept
    with trusted_dir.open_trusted(str(tmp_path), create=False) as d:
        d.publish("f", b"second", replace=True)
    assert target.read_bytes() == b"second"
    assert oct(target.stat().st_mode & 0o777) == "0o600"

    def fails(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), fails, durable=True)
    assert target.read_bytes() == b"second"
    # no temporary file is left behind
    atomic_write(str(tmp_path / "g"), lambda f: f.write(b""))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "g"]


def test_numba_bound_in_pyproject_is_the_tested_range():
    root = os.path.dirname(os.path.dirname(os.path.abspath(jg.__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:
        spec = re.search(r'"numba>=(\d+)\.(\d+),<(\d+)\.(\d+)"', f.read())
    assert spec, "pyproject.toml must bound numba from both sides"
    lo, hi = (int(spec[1]), int(spec[2])), (int(spec[3]), int(spec[4]))
    assert (lo, hi) == cache.TESTED_NUMBA


# ---------------------------------------------------------------- several processes at once

_CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np, jitgrad as jg
    ready, go, c = sys.argv[1], sys.argv[2], float(sys.argv[3])
    from jitgrad.compiler import kernels
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


def test_a_file_owned_by_another_user_is_refused_without_suggesting_chmod(cache_dir, monkeypatch,
                                                                           capsys):
    """chmod cannot change a file's owner: the fix offered is removing it or another cache."""
    source, c = fresh_source()
    load(source)
    for path in [next(cache_dir.glob("jg_test_*.py")), numba_files(cache_dir, ".nbi")[0]]:
        with monkeypatch.context() as m:
            foreign(m, [path])
            with pytest.raises(jg.CacheSecurityError) as info:
                load(source)
            msg = str(info.value)
            assert f"{path} is owned by uid {FOREIGN_UID}, not by you" in msg
            assert "chmod" in msg and "chmod go-w" not in msg  # "chmod cannot fix it"
            assert "jitgrad cache clear" in msg and "JITGRAD_CACHE_DIR" in msg
            assert cli.main(["cache", "info"]) == 1
            out = capsys.readouterr().out
            assert f"{path} is owned by uid {FOREIGN_UID}" in out and "chmod go-w" not in out
            assert cli.main(["cache", "clear"]) == 0  # the fix offered works
        assert load(source).jg_scale.ctypes(2.0) == 2.0 * c + 1.0


# ---------------------------------------------------------------- the kernel library's helpers

_LIBRARY_CHILD = textwrap.dedent("""
    import numpy as np, jitgrad as jg
    from jitgrad.compiler import kernels
    kernels.ensure_loaded()
    f = jg.jit(lambda x: jg.sum(x, axis=0), backend="numba")
    print(repr(f(np.arange(6.0).reshape(2, 3)).tolist()))
""")


def _session_library():
    """The session's compiled kernel library: its cache directory, and the name of the
    module (one per kernel and dtype) holding jg_sum_f64."""
    kernels.ensure_loaded()
    module = next(m for n, m in sys.modules.items()
                  if n.startswith("jg_kernels_") and hasattr(m, "jg_sum_f64"))
    return os.path.dirname(module.__file__), module.__name__


def test_kernel_helpers_are_cached_in_the_sealed_cache(tmp_path, monkeypatch, capsys):
    """The kernel library's own @njit helpers: their Numba files live in the cache directory
    (checked, checksummed, counted by `cache info`, removed by `cache clear`), never in the
    installed package's __pycache__, where a truncated index once broke every compile."""
    session, sum_f64 = _session_library()
    cache_dir = tmp_path / "cache"
    (cache_dir / "__pycache__").mkdir(parents=True, mode=0o700)
    os.chmod(cache_dir, 0o700)

    def copy_library():
        # all of the compiled library but jg_sum_f64, so that a child compiles that one
        # wrapper and with it the reduce_sum helper, and nothing else
        for sub in ("", "__pycache__"):
            for name in os.listdir(os.path.join(session, sub)):
                if name.startswith("jg_kernels_") and not name.startswith(sum_f64):
                    shutil.copy2(os.path.join(session, sub, name), cache_dir / sub / name)
        for f in (cache_dir / "__pycache__").glob(f"{sum_f64}.*"):
            f.unlink()

    env = {**os.environ, "JITGRAD_CACHE_DIR": str(cache_dir), "JITGRAD_NUM_THREADS": "1"}
    env.pop("NUMBA_CACHE_DIR", None)

    def child():
        p = subprocess.run([sys.executable, "-c", _LIBRARY_CHILD], env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip().splitlines()[-1] == "[3.0, 5.0, 7.0]"
        return p.stderr

    before = package_numba_files()
    copy_library()
    child()
    assert package_numba_files() == before  # nothing written into the installed package
    helper = sorted((cache_dir / "__pycache__").glob("jg_pkg_*.reduce.reduce_sum-*"))
    assert [f.suffix for f in helper] == [".nbc", ".nbi"], helper
    for f in helper:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        assert f.read_bytes().startswith(cache._MAGIC)  # sealed like every other Numba file

    index = helper[1]
    index.write_bytes(index.read_bytes()[:len(index.read_bytes()) // 2])  # truncated
    copy_library()
    err = child()  # compiles again: the damaged index is a miss, not an UnpicklingError
    assert "rebuilding" in err and index.name in err, err
    blob = index.read_bytes()
    assert hashlib.sha256(blob[len(cache._MAGIC) + 32:]).digest() == blob[len(cache._MAGIC):][:32]

    monkeypatch.setenv("JITGRAD_CACHE_DIR", str(cache_dir))
    assert cli.main(["cache", "info"]) == 0
    n = len(list((cache_dir / "__pycache__").glob("*.nb?")))
    assert f"numba files: {n}" in capsys.readouterr().out
    assert cli.main(["cache", "clear"]) == 0
    capsys.readouterr()
    assert os.listdir(cache_dir) == []


# ---------------------------------------------------------------- a Numba this was not tested with

_UNTESTED_CHILD = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("always")
    import numba
    numba.__version__ = sys.argv[1]
    import numpy as np, jitgrad as jg
    from numba.core import caching
    f = jg.jit(lambda x: jg.sum(jg.tanh(x) * 3.0), backend="numba")
    g = jg.jit(lambda x: jg.sum(x * x), backend="numba")
    print(repr(float(f(np.arange(4.0)))), repr(float(g(np.arange(3.0)))))
    print("patched" if getattr(caching.Cache, "_jitgrad_installed", False) else "untouched")
    from jitgrad.tools import cli
    cli.main(["cache", "info"])
""")


def test_an_untested_numba_caches_nothing_with_one_warning(tmp_path):
    """The cache patches Numba's private caching classes: on a Numba version it was not
    tested with, it must neither crash nor write an unsealed cache, only compile."""
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "JITGRAD_CACHE_DIR": str(cache_dir), "JITGRAD_NUM_THREADS": "1"}
    env.pop("NUMBA_CACHE_DIR", None)
    before = package_numba_files()
    p = subprocess.run([sys.executable, "-c", _UNTESTED_CHILD, "0.99.0"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    x = np.arange(4.0)
    assert out[0] == f"{float(np.sum(np.tanh(x) * 3.0))!r} 5.0"
    assert out[1] == "untouched"  # Numba's classes are not patched
    assert "on-disk caching: OFF (numba 0.99.0 is not a version" in p.stdout
    warned = re.findall(r"RuntimeWarning: jitgrad: numba 0\.99\.0 is not a version it was "
                        r"tested with \(>=0\.60,<0\.69\)", p.stderr)
    assert len(warned) == 1, p.stderr
    assert not cache_dir.exists() or not any(cache_dir.rglob("*"))  # nothing cached on disk
    assert package_numba_files() == before
