"""jitgrad's airspeed-velocity suite (asv.conf.json at the top level) and comparison scripts.

Thread pools are pinned to 2 threads before numpy/Numba load, so every benchmark
process is comparable (set the variables yourself to override).
"""

from ._common import pin_env_before_import

pin_env_before_import()
