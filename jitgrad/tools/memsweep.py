"""`jitgrad memsweep`: memory against runtime of one training step, per recomputation policy.

A deep ReLU MLP chain (or, with `--model gpt`, a GPT's AdamW step) is compiled as a
`train_step` under each policy (`none`, `sqrt`, byte budgets; for the GPT also `blocks`:
every transformer block a `jg.checkpoint` region). Each policy runs in a process of its
own, policies alternating over rounds (a machine's noise then hits all of them alike); a
first warm-up round compiles into the cache, so that the measured processes
only load compiled code. In a measured process:

- planned peak: `plan.arena_bytes`, the arena the planner laid out;
- measured peak: how far the first call raises the process's peak resident
  memory above what was resident just before it (the arena's pages are first
  touched in that call: `lower()` has already loaded the code and reserved
  the arena);
- step time: the median of the timed steps after the first.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import numpy as np

from ..compiler.memory import Plan
from .options import policy_options


@dataclass(frozen=True)
class Model:
    depth: int = 32
    width: int = 256
    batch: int = 1024
    dtype: str = "float32"

    def make(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        rng = np.random.default_rng(0)
        params = []
        for _ in range(self.depth):
            w = rng.standard_normal((self.width, self.width)) * np.sqrt(2.0 / self.width)
            params += [w.astype(self.dtype), np.full(self.width, 0.01, self.dtype)]
        x = rng.standard_normal((self.batch, self.width)).astype(self.dtype)
        y = rng.integers(0, self.width, self.batch)
        return params, x, y

    @property
    def activation_bytes(self) -> int:
        return self.batch * self.width * np.dtype(self.dtype).itemsize

    @property
    def title(self) -> str:
        return (f"{self.depth}-layer ReLU MLP, width {self.width}, batch {self.batch}, "
                f"{self.dtype} (one activation {self.activation_bytes / 2**20:.1f} MiB)")

    def train_step(self, policy: str) -> tuple[Any, tuple[Any, ...]]:
        """(the SGD train_step under policy, its batch)."""
        import jitgrad as jg
        params, x, y = self.make()
        return jg.train_step(chain_loss, params, jg.optim.SGD(lr=1e-3),
                             **jit_options(policy)), (x, y)


@dataclass(frozen=True)
class GPTModel:
    """A GPT's AdamW training step (jg.nn.gpt_loss); policy "blocks" checkpoints each block."""

    n_layer: int = 6
    n_embd: int = 384
    n_head: int = 6
    block: int = 256
    batch: int = 8
    dtype: str = "float32"

    @property
    def activation_bytes(self) -> int:
        return self.batch * self.block * self.n_embd * np.dtype(self.dtype).itemsize

    @property
    def title(self) -> str:
        return (f"{self.n_layer}-layer GPT, width {self.n_embd}, {self.n_head} heads, block "
                f"{self.block}, batch {self.batch}, {self.dtype} (the residual stream "
                f"{self.activation_bytes / 2**20:.1f} MiB)")

    def train_step(self, policy: str) -> tuple[Any, tuple[Any, ...]]:
        import jitgrad as jg

        from ..training import gpt
        cfg = gpt.GPTConfig(65, self.block, self.n_layer, self.n_head, self.n_embd)
        params = gpt.gpt_init(cfg, 0, self.dtype)
        ids = np.random.default_rng(1).integers(0, 65, size=(self.batch, self.block + 1))
        blocks = policy == "blocks"
        loss = functools.partial(gpt.gpt_loss, n_head=self.n_head, checkpoint_blocks=blocks)
        opt = jg.optim.AdamW(weight_decay=0.1, mask=gpt.decay_mask(params), clip_norm=1.0)
        step = jg.train_step(loss, params, opt, **({} if blocks else jit_options(policy)))
        return step, (ids[:, :-1], ids[:, 1:])


MODELS = {"mlp": Model, "gpt": GPTModel}


def _kind(model: Model | GPTModel) -> str:
    return next(k for k, cls in MODELS.items() if isinstance(model, cls))


def chain_loss(params: list[Any], x: Any, y: Any) -> Any:
    import jitgrad as jg
    h = x
    for i in range(0, len(params), 2):
        h = h @ params[i] + params[i + 1]
        if i + 2 < len(params):
            h = jg.relu(h)
    return jg.softmax_cross_entropy(h, y)


POLICIES = ("none", "sqrt", "full", "blocks")  # named ones (blocks: GPT); or a byte budget
jit_options = policy_options  # a policy -> train_step's keyword arguments


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(model: Model | GPTModel, policy: str, steps: int) -> dict[str, Any]:
    """Run in a fresh process: compile or load, one measured first call, timed steps."""
    step, batch = model.train_step(policy)
    entry = step.lower(*batch)
    before = _rss_bytes()
    step(*batch)
    grown = max(_peak_rss_bytes() - before, 0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(*batch)
        times.append(time.perf_counter() - t)
    plan, report = entry.plan, entry.remat
    return {"policy": policy, "planned_peak": plan.arena_bytes,
            "lower_bound": plan.peak_live_bytes,
            "measured_peak": grown, "step_s": statistics.median(times),
            "recompute_flops": report.recompute_flops, "forward_flops": report.forward_flops,
            "stored": len(report.stored), "saved": len(report.saved)}


def _worker(model: Model | GPTModel, policy: str, steps: int) -> dict[str, Any]:
    spec = {"kind": _kind(model), **asdict(model)}
    cmd = [sys.executable, "-m", "jitgrad.tools.memsweep", json.dumps(spec), policy,
           str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines() or ["(no output)"]
        return {"policy": policy, "error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


@functools.lru_cache(maxsize=16)  # budgets and --timeline plan the same policies
def planned(model: Model | GPTModel, policy: str) -> Plan:
    """The memory plan of the model's training step under a policy (planning only: the
    program is traced and laid out, nothing is compiled)."""
    step, batch = model.train_step(policy)
    return step.plan_only(*batch).plan


def default_budgets(model: Model | GPTModel, fractions: list[float]) -> list[int]:
    """Budgets spread between what sqrt and no recomputation plan."""
    full, low = planned(model, "none").arena_bytes, planned(model, "sqrt").arena_bytes
    return [int(low + f * (full - low)) for f in fractions]


def sweep(model: Model | GPTModel, policies: list[str], rounds: int, steps: int,
          log: TextIO | None = None) -> list[dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    for r in range(rounds + 1):  # round 0 compiles into the cache and is not counted
        for policy in policies:
            if log is not None:
                print(f"{'warm-up' if r == 0 else f'round {r}/{rounds}'}: {policy}",
                      file=log, flush=True)
            result = _worker(model, policy, steps if r else 1)
            if r or "error" in result:
                runs[policy].append(result)
    rows = []
    for policy in policies:
        errors = [x for x in runs[policy] if "error" in x]
        if errors:
            rows.append({"policy": policy, "error": errors[0]["error"]})
            continue
        first = runs[policy][0]
        row = {k: first[k] for k in ("policy", "planned_peak", "lower_bound",
                                     "recompute_flops", "forward_flops", "stored", "saved")}
        row["measured_peak"] = int(statistics.median(x["measured_peak"] for x in runs[policy]))
        row["step_s"] = statistics.median(x["step_s"] for x in runs[policy])
        rows.append(row)
    base = next((x["step_s"] for x in rows if x["policy"] == "none" and "step_s" in x), None)
    for row in rows:
        if "step_s" in row:
            row["time_ratio"] = row["step_s"] / base if base else float("nan")
            row["recompute_ratio"] = row["recompute_flops"] / (3 * row["forward_flops"])
    return rows


COLUMNS = ["policy", "budget", "planned_peak", "lower_bound", "measured_peak", "measured/planned",
           "step_ms", "time_ratio", "recompute_ratio", "stored"]


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        policy = row["policy"]
        budget = policy if policy.isdigit() else ""
        name = "budget" if budget else policy
        if "error" in row:
            out.append({"policy": name, "budget": budget, "error": row["error"]})
            continue
        out.append({"policy": name, "budget": budget, "planned_peak": row["planned_peak"],
                    "lower_bound": row["lower_bound"], "measured_peak": row["measured_peak"],
                    "measured/planned": row["measured_peak"] / row["planned_peak"],
                    "step_ms": 1e3 * row["step_s"], "time_ratio": row["time_ratio"],
                    "recompute_ratio": row["recompute_ratio"],
                    "stored": f"{row['stored']}/{row['saved']}"})
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    big = max((r.get("planned_peak", 0) for r in rows), default=0) >= 10 * 2 ** 20
    mb, unit = (2 ** 20, "MiB") if big else (2 ** 10, "KiB")
    lines = [f"{'policy':<8} {'budget ' + unit:>10} {'planned ' + unit:>11} "
             f"{'measured ' + unit:>12} "
             f"{'meas/plan':>9} {'step ms':>9} {'x none':>7} {'recompute':>9} {'stored':>7}"]
    for r in rows:
        budget = f"{int(r['budget']) / mb:.1f}" if r["budget"] else "-"
        if "error" in r:
            lines.append(f"{r['policy']:<8} {budget:>10}  {r['error']}")
            continue
        lines.append(f"{r['policy']:<8} {budget:>10} {r['planned_peak'] / mb:>11.1f} "
                     f"{r['measured_peak'] / mb:>12.1f} {r['measured/planned']:>9.2f} "
                     f"{r['step_ms']:>9.1f} {r['time_ratio']:>7.2f} "
                     f"{r['recompute_ratio']:>9.1%} {r['stored']:>7}")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + ["error"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_frontier(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Step time against planned and measured peak memory, one point per policy."""
    from .timeline import new_figure
    fig = new_figure((6.4, 4.2))
    ax = fig.subplots()
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r["planned_peak"])
    mb = 2 ** 20
    ax.plot([r["planned_peak"] / mb for r in ok], [r["step_ms"] for r in ok], "o-",
            label="planned peak (arena)")
    ax.plot([r["measured_peak"] / mb for r in ok], [r["step_ms"] for r in ok], "x",
            label="measured peak (RSS growth)")
    for r in ok:
        label = r["policy"] if not r["budget"] else f"{int(r['budget']) / mb:.0f} MiB"
        ax.annotate(label, (r["planned_peak"] / mb, r["step_ms"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("peak memory of a step (MiB)")
    ax.set_ylabel("step time (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Worker entry point: `python -m jitgrad.tools.memsweep MODEL_JSON POLICY STEPS`."""
    spec = json.loads(sys.argv[1])
    model = MODELS[spec.pop("kind", "mlp")](**spec)
    print(json.dumps(measure(model, sys.argv[2], int(sys.argv[3]))))


if __name__ == "__main__":
    main()
