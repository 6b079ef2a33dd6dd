"""The memory timeline: live bytes at each step of a plan, drawn with matplotlib.

One line per plan (e.g. per recomputation policy), so policies can be compared
in one figure: the live bytes at each step (kernel call), the peak marked (it
is the plan's `peak_live_bytes`, the most bytes ever live at once), the arena the
planner laid out (`arena_bytes`, at least the peak: the gap is fragmentation)
as a dashed line, and the first backward step as a vertical line.
`jitgrad show --timeline` and `jitgrad memsweep --timeline` draw with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..compiler.memory import Plan
from ..errors import JitgradError


@dataclass
class TimelineSeries:
    """What is drawn for one plan (returned so that callers and tests can check it)."""

    name: str
    live: list[int]            # bytes live at each step
    peak: int                  # max(live) == plan.peak_live_bytes
    peak_step: int
    arena: int                 # plan.arena_bytes, the dashed line
    backward_start: int | None  # first backward step (None: no backward pass)
    recompute_steps: list[int]


def series(name: str, plan: Plan) -> TimelineSeries:
    live = plan.live_bytes()
    peak = max(live, default=0)
    roles = list(plan.step_roles)
    return TimelineSeries(
        name, live, peak, live.index(peak) if live else 0, plan.arena_bytes,
        next((i for i, r in enumerate(roles) if r == "backward"), None),
        [i for i, r in enumerate(roles) if r == "recompute"])


def _unit(nbytes: int) -> tuple[str, float]:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= 2 * scale:
            return unit, float(scale)
    return "bytes", 1.0


def new_figure(figsize: tuple[float, float], dpi: float = 100) -> Any:
    """A matplotlib Figure that leaves the user's matplotlib as it was: no pyplot figure
    manager, no `matplotlib.use()` (that would switch the backend an interactive session
    chose). `fig.savefig(path)` picks a renderer from the file's suffix by itself."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise JitgradError("drawing needs matplotlib: pip install 'jitgrad[plot]'") from None
    return Figure(figsize=figsize, dpi=dpi)


def plot_timeline(plans: Mapping[str, Plan] | Plan, path: str | os.PathLike[str], *,
                  title: str | None = None) -> list[TimelineSeries]:
    """Draw the live-bytes timeline of one plan or of several ({name: plan}) into path
    (a .png or .svg); returns the series drawn."""
    if isinstance(plans, Plan):
        plans = {"plan": plans}
    drawn = [series(name, plan) for name, plan in plans.items()]
    if not drawn:
        raise JitgradError("plot_timeline needs at least one plan")
    unit, scale = _unit(max(max(s.arena, s.peak) for s in drawn))
    fig = new_figure((8.0, 3.6))
    ax = fig.subplots()
    from matplotlib import rcParams
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    top = 0.0
    for k, s in enumerate(drawn):
        c = colours[k % len(colours)]
        steps = list(range(len(s.live)))
        y = [b / scale for b in s.live]
        ax.step(steps, y, where="post", color=c, lw=1.6, label=f"{s.name}: live")
        ax.fill_between(steps, y, step="post", color=c, alpha=0.12)
        for i in s.recompute_steps:  # recomputation happens inside the backward sweep
            ax.axvspan(i, i + 1, color=c, alpha=0.08, lw=0)
        ax.axhline(s.arena / scale, color=c, ls="--", lw=1.0,
                   label=f"{s.name}: arena {s.arena / scale:,.1f} {unit}")
        ax.plot([s.peak_step], [s.peak / scale], marker="v", color=c, ms=8, ls="none")
        late = s.peak_step > 0.7 * len(s.live)  # keep the label inside the axes
        ax.annotate(f"peak {s.peak / scale:,.1f} {unit}", (s.peak_step, s.peak / scale),
                    textcoords="offset points", xytext=(-6 if late else 4, 6), fontsize=8,
                    color=c, ha="right" if late else "left")
        if s.backward_start is not None:
            ax.axvline(s.backward_start, color=c, ls=":", lw=1.2)
            if all(o.backward_start != s.backward_start for o in drawn[:k]):  # label once
                ax.annotate("backward →", (s.backward_start, 0), textcoords="offset points",
                            xytext=(3, 3), fontsize=8, color=c)
        top = max(top, s.arena / scale, s.peak / scale)
    ax.set_ylim(0, top * 1.18 or 1)
    ax.set_xlim(0, max(len(s.live) for s in drawn) + 1)
    ax.set_xlabel("step (kernel call)")
    ax.set_ylabel(f"live {unit}")
    ax.set_title(title or "memory timeline", fontsize=11)
    # outside the axes: inside, it would hide the early steps where memory builds up
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    return drawn
