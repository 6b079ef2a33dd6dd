"""asv: the full SGD training step (forward, softmax-xent + L2, backward, update) of the five
MLP configs, float32 and float64, float32 under bfloat16 mixed precision, the two conv nets
and the GPT step (AdamW, clipping) of benchmarks/_gpt.py. Compilation (or the cache load)
happens in setup."""

import time

from . import _cnn
from . import _common as C
from . import _gpt as G


class TrainStep:
    params = (list(C.CONFIGS), ["float32", "float64"])
    param_names = ["config", "dtype"]
    timeout = 600

    def setup(self, config, dtype):
        C.pin_threads()
        self.step, self.p, self.x, self.y = C.make_jitgrad_step(config, dtype)
        self.step(self.x, self.y)  # trace + compile (or load from the cache): not timed

    def time_train_step(self, config, dtype):
        self.step(self.x, self.y)


class TrainStepBF16:
    """The float32 step under precision="bf16" (GEMM operands rounded to bfloat16; on CPUs
    with AMX/AVX512_BF16 and the mkl extra, bfloat16 GEMMs): against TrainStep's float32."""

    params = (list(C.CONFIGS),)
    param_names = ["config"]
    timeout = 600

    def setup(self, config):
        C.pin_threads()
        self.step, self.p, self.x, self.y = C.make_jitgrad_step(config, precision="bf16")
        self.step(self.x, self.y)

    def time_train_step_bf16(self, config):
        self.step(self.x, self.y)


class TrainStepNative:
    """The same step as one bare native call (no Python wrapper, no copy of the new
    parameters): the gap to time_train_step is jitgrad's per-call Python overhead."""

    params = (list(C.CONFIGS), ["float32"])
    param_names = ["config", "dtype"]
    timeout = 600

    def setup(self, config, dtype):
        C.pin_threads()
        step, p, x, y = C.make_jitgrad_step(config, dtype)
        step(x, y)
        self.run, self.keep = C.native_runner(step.compiled, p, step.state,
                                              step.optimizer.hyper(1), x, y)

    def time_native_step(self, config, dtype):
        self.run()


class NumpyTrainStep:
    """Hand-written numpy backprop of the same step, for ratios."""

    params = (list(C.CONFIGS), ["float32"])
    param_names = ["config", "dtype"]

    def setup(self, config, dtype):
        C.pin_threads()
        self.step, self.p, self.x, self.y = C.numpy_step_factory(config, dtype)
        self.step(self.x, self.y)

    def time_numpy_train_step(self, config, dtype):
        self.step(self.x, self.y)


class ConvNetTrainStep:
    """The conv-net SGD step (issue 20): LeNet-5 on 1x28x28 at batch 64, and 3x3 convs of 32
    and 64 channels on 1x28x28 at batch 128 (_cnn.py), float32 and float64."""

    params = (list(_cnn.CNN_CONFIGS), ["float32", "float64"])
    param_names = ["config", "dtype"]
    timeout = 600

    def setup(self, config, dtype):
        C.pin_threads()
        self.step, self.p, self.x, self.y = _cnn.jitgrad_step(config, dtype)
        self.step(self.x, self.y)  # trace + compile (or load from the cache): not timed

    def time_conv_train_step(self, config, dtype):
        self.step(self.x, self.y)


class GPTTrainStep:
    """The GPT training step (forward, cross-entropy, backward, clipping, AdamW) of
    benchmarks/_gpt.py: nanoGPT's baby GPT and the width-384, 6-layer, block-256 model."""

    params = (list(G.CONFIGS),)
    param_names = ["config"]
    timeout = 900

    def setup(self, config):
        C.pin_threads()
        self.step, self.p, self.x, self.y = G.jitgrad_step(config)
        self.step(self.x, self.y)  # trace + compile (or load from the cache): not timed

    def time_gpt_train_step(self, config):
        self.step(self.x, self.y)

    def track_gpt_tokens_per_s(self, config):
        t = time.perf_counter()
        for _ in range(3):
            self.step(self.x, self.y)
        return 3 * G.tokens_per_step(config) / (time.perf_counter() - t)

    track_gpt_tokens_per_s.unit = "tokens/s"
