"""asv: memory of an MLP training step — the planner's planned arena size (track_) and the
process's peak resident memory while stepping (peakmem_), per recomputation policy."""

from . import _common as C

CONFIGS = ["small", "medium", "deep", "large"]
POLICIES = ["none", "sqrt"]


def _step(config, policy):
    import jitgrad as jg
    params = C.make_params(config)
    x, y = C.make_batch(config)
    opts = {} if policy == "none" else {"remat": policy}
    step = jg.train_step(C.jitgrad_loss, params, jg.optim.SGD(lr=C.LR), **opts)
    step(x, y)
    return step, x, y


class StepMemory:
    params = (CONFIGS, POLICIES)
    param_names = ["config", "remat"]
    timeout = 600

    def setup(self, config, policy):
        C.pin_threads()
        self.step, self.x, self.y = _step(config, policy)

    def track_planned_peak_bytes(self, config, policy):
        return int(self.step.compiled.plan.arena_bytes)

    track_planned_peak_bytes.unit = "bytes"

    def track_planned_vs_params(self, config, policy):
        """Planned arena ÷ bytes of the parameters."""
        nparam = sum(p.nbytes for p in C.make_params(config))
        return self.step.compiled.plan.arena_bytes / nparam

    track_planned_vs_params.unit = "ratio"

    def peakmem_train_step(self, config, policy):
        for _ in range(3):
            self.step(self.x, self.y)
