"""The memory plan's invariants, checked by every test that builds a plan."""

from jitgrad.compiler.memory import ALIGN


def assert_plan_sound(plan):
    """Aligned buffers inside the arena, no two live at once overlapping, and the lower
    bound (most bytes live at once) at most the arena."""
    buffers = plan.unique_buffers()
    for b in buffers:
        assert b.offset % ALIGN == 0 and b.offset + b.nbytes <= plan.arena_bytes
    for i, a in enumerate(buffers):
        for b in buffers[i + 1:]:
            if a.overlaps_in_time(b):
                assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset
    assert max(plan.live_bytes(), default=0) == plan.peak_live_bytes <= plan.arena_bytes
