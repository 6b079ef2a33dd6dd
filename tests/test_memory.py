"""The memory planner on hand-made schedules: reuse, in-place rules, alignment, bounds."""

import numpy as np
from plancheck import assert_plan_sound

from jitgrad.compiler.memory import ALIGN, StepUse, plan
from jitgrad.frontend.ir import Var

F32 = np.dtype(np.float32)


def v(n, dtype=F32):
    return Var((n,), np.dtype(dtype))


def test_dead_buffers_are_reused_and_offsets_aligned():
    a, b, c, d = v(100), v(100), v(100), v(3)
    steps = [StepUse([a], []), StepUse([b], [a]), StepUse([c], [b]), StepUse([d], [c])]
    p = plan(steps, keep=[d], external=set(), in_place=False)
    assert all(buf.offset % ALIGN == 0 for buf in p.unique_buffers())
    # a and c never live together: c takes a's place; the arena holds two rows, not three
    assert p.buffers[c].offset == p.buffers[a].offset
    assert p.arena_bytes == 2 * 448 and p.peak_live_bytes == 2 * 448


def test_in_place_only_where_the_input_dies_with_the_same_size_and_dtype():
    x, y, z, w = v(64), v(64), v(64), v(64)
    # y = f(x) elementwise where x dies: in place
    p = plan([StepUse([x], []), StepUse([y], [x], [(y, x)]), StepUse([z], [y])],
             keep=[z], external=set())
    assert p.buffers[y] is p.buffers[x] and p.in_place == 1
    # x is read again later: y must not overwrite it
    p = plan([StepUse([x], []), StepUse([y], [x], [(y, x)]), StepUse([z], [x, y])],
             keep=[z], external=set())
    assert p.buffers[y] is not p.buffers[x]
    # x is a result (kept to the end): never overwritten
    p = plan([StepUse([x], []), StepUse([y], [x], [(y, x)])], keep=[x, y], external=set())
    assert p.buffers[y] is not p.buffers[x]
    # another dtype or size: no sharing
    xi, s = v(64, np.int32), v(32)
    p = plan([StepUse([xi], []), StepUse([w], [xi], [(w, xi)]), StepUse([s], [w])],
             keep=[s], external=set())
    assert p.buffers[w] is not p.buffers[xi]
    # an external input (argument, constant) is never written
    p = plan([StepUse([y], [x], [(y, x)])], keep=[y], external={x})
    assert x not in p.buffers


def test_live_buffers_never_overlap_on_random_schedules():
    rng = np.random.default_rng(0)
    for _ in range(50):
        values = [v(int(rng.integers(1, 300))) for _ in range(30)]
        steps = []
        for i, out in enumerate(values):
            reads = [values[j] for j in rng.choice(i, size=min(i, 2), replace=False)] if i else []
            same = [(out, r) for r in reads if r.nbytes == out.nbytes]
            steps.append(StepUse([out], reads, same))
        assert_plan_sound(plan(steps, keep=values[-3:], external=set()))
