"""asv: compile latency in a new process (timeraw_: asv times a fresh interpreter running
the code; the setup part, which prepares the cache directory, is not timed).

* a new program: the medium MLP train step in a cache directory that holds only the compiled
  kernel library (a copy of a warmed one), so its glue and fused loops compile;
* a cache hit: the same program in a directory where it was already compiled.
Both include interpreter start-up and `import jitgrad` (as a user's script pays them).
"""

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

_PROGRAM = f"""
import sys
sys.path.insert(0, {HERE!r})
import jitgrad as jg
import _common as C
params = C.make_params("medium")
x, y = C.make_batch("medium")
step = jg.train_step(C.jitgrad_loss, params, jg.optim.SGD(lr=C.LR))
step(x, y)
"""


def _warm_dir(name, code):
    """A cache directory prepared once per machine and kernel library (kept in tmp)."""
    from jitgrad.compiler import kernels
    path = os.path.join(tempfile.gettempdir(), f"jitgrad-asv-{name}-{kernels.library_hash()}")
    if not os.path.isdir(path):
        tmp = path + f".{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, mode=0o700)
        env = dict(os.environ, JITGRAD_CACHE_DIR=tmp)
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _library_dir():
    return _warm_dir("library", "from jitgrad.compiler import kernels; kernels.ensure_loaded()")


def _setup_copy(src):
    return f"""
import os, shutil, tempfile
d = tempfile.mkdtemp(prefix="jg-asv-")
shutil.rmtree(d)
shutil.copytree({src!r}, d, copy_function=shutil.copy2)
os.environ["JITGRAD_CACHE_DIR"] = d
"""


def timeraw_new_program():
    return _PROGRAM, _setup_copy(_library_dir())


def timeraw_cache_hit():
    return _PROGRAM, _setup_copy(_warm_dir("medium", _PROGRAM))


def timeraw_import_jitgrad():
    """The floor under both: interpreter start-up and `import jitgrad`."""
    return "import jitgrad"


timeraw_new_program.timeout = 600
timeraw_cache_hit.timeout = 600
