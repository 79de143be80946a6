import math

import pytest

from zotune.train.scale import StepScale


def test_none_passes_the_schedule_through():
    s = StepScale("none")
    s.update([3.0, -4.0])
    assert s.lr(1e-3) == 1e-3


def test_first_step_has_no_scale_then_lr_is_divided_by_the_rms_of_g():
    s = StepScale("rms", decay=0.9)
    assert s.lr(1e-3) == 0.0  # nothing seen yet
    s.update([3.0, -4.0, 0.0, 5.0])  # mean g^2 = 12.5; bias correction makes one step exact
    assert s.lr(1e-3) == pytest.approx(1e-3 / math.sqrt(12.5), rel=1e-12)


@pytest.mark.parametrize("factor", [0.1, 4.0, 1e3])
def test_the_lr_sequence_is_invariant_to_the_loss_scale(factor):
    """A loss c times larger gives g c times larger: lr * g, the update, stays the same."""
    gs = [[0.5, -1.5, 2.0, 0.1], [1.0, 1.0, -3.0, 0.2], [-0.7, 0.4, 0.9, -2.2]] * 5
    a, b = StepScale("rms"), StepScale("rms")
    for g in gs:
        step_a = [a.lr(1e-3) * x for x in g]
        step_b = [b.lr(1e-3) * factor * x for x in g]
        assert step_a == pytest.approx(step_b, rel=1e-9, abs=0)
        a.update(g)
        b.update([factor * x for x in g])


def test_state_round_trip_continues_identically():
    a = StepScale("rms")
    for g in ([1.0, 2.0], [0.5, -0.5], [3.0, 0.0]):
        a.update(g)
    b = StepScale("rms")
    b.load_state(a.state())
    a.update([0.3, 0.4])
    b.update([0.3, 0.4])
    assert a.lr(0.1) == b.lr(0.1)


@pytest.mark.parametrize("k", [0.25, 4.0])
def test_ms_steps_are_invariant_to_the_parameter_scale(k):
    """L(B) = f(k B): g grows by k, so the step in B units must shrink by k (the step in k B units
    stays the same). lr / mean(g^2) does that; lr / rms(g) does not."""
    gs = [[0.5, -1.5, 2.0, 0.1], [1.0, 1.0, -3.0, 0.2], [-0.7, 0.4, 0.9, -2.2]] * 5
    a, b = StepScale("ms"), StepScale("ms")
    for g in gs:
        step_a = [a.lr(1e-3) * x for x in g]  # the update's size per unit of z, in B units
        step_b = [b.lr(1e-3) * k * x for x in g]
        assert [k * x for x in step_b] == pytest.approx(step_a, rel=1e-9, abs=0)
        a.update(g)
        b.update([k * x for x in g])
