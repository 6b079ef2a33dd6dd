"""The result of a function with a derivative rule of its user's (`jg.custom_vjp`).

A call of such a function is traced as ordinary code: its forward function computes
the outputs and the residuals, and `custom_vjp_call` marks where they meet. Its
inputs are the call's traced arguments, the residuals and the outputs; its results
are the outputs, unchanged. Differentiation reads the rule (`custom_vjp.Rule`) from
its parameters: the user's backward function maps residuals and output cotangents to
argument cotangents, and nothing flows into the forward function's own computation of
the outputs. The residuals are ordinary values, so differentiating the backward sweep
again reaches the forward code that computed them (order 2 and more). Once
differentiation is done the instruction is the identity: `passes.simplify` removes it,
so the forward code compiles, fuses and is planned like any other.
"""

from __future__ import annotations

from ..core import primitive

custom_vjp_call_p = primitive("custom_vjp_call", "custom", n_outputs=None)
custom_vjp_call_p.def_impl(lambda *xs, rule: xs[len(xs) - rule.n_outputs:])
custom_vjp_call_p.def_shape(lambda *avals, rule: avals[len(avals) - rule.n_outputs:])
custom_vjp_call_p.def_vjp(lambda cts, outs, ins, *, rule: rule.vjp(cts, ins))
custom_vjp_call_p.def_simplify(lambda ins, producer: ins.inputs[len(ins.inputs)
                                                                - len(ins.outputs):])
custom_vjp_call_p.def_label(lambda ins: f"[{ins.kw['rule']}]")


def custom_vjp_call(*inputs, rule):
    """The outputs (the last rule.n_outputs inputs), differentiated by rule."""
    return custom_vjp_call_p.bind(*inputs, rule=rule)
