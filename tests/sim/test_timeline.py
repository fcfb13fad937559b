"""The op-graph engine: streams, barriers, the planned network, Lina's priority rule."""

from __future__ import annotations

import numpy as np
import pytest

from shunter.sim.timeline import Collective, Compute, TimelineOptions, run_timeline


def flow(
    name: str, src: int, dst: int, num_bytes: float, after: tuple[str, ...] = (), **kwargs: object
) -> Collective:
    return Collective(name, np.array([src]), np.array([dst]), np.array([num_bytes]), after, **kwargs)  # type: ignore[arg-type]


def test_a_device_computes_one_op_at_a_time_in_list_order() -> None:
    """Oracle: device 0 runs a (2 s) then b (3 s) although b has no dependency: ends at 5 s."""
    ops = [Compute("a", np.array([2.0, 0.0])), Compute("b", np.array([3.0, 1.0]))]
    timeline = run_timeline(ops, np.ones(2), TimelineOptions())
    assert timeline.compute_start_s["b"] == pytest.approx([2.0, 0.0])
    assert timeline.makespan_s == pytest.approx(5.0)


def test_a_copy_stream_runs_beside_compute_and_is_not_utilisation() -> None:
    """Oracle: 4 s of copy overlaps 4 s of compute: 4 s in all, utilisation 1 on the device."""
    ops = [Compute("copy", np.array([4.0]), stream="copy"), Compute("work", np.array([4.0]))]
    timeline = run_timeline(ops, np.ones(1), TimelineOptions())
    assert timeline.makespan_s == pytest.approx(4.0)
    assert timeline.utilisation == pytest.approx([1.0])


def test_a_collective_waits_for_its_inputs_on_every_device() -> None:
    """Oracle: a barrier: the flow starts when the slowest device (3 s) is done; 10 B at 5 B/s."""
    ops = [Compute("g", np.array([1.0, 3.0])), flow("n", 0, 1, 10.0, ("g",))]
    timeline = run_timeline(ops, np.full(2, 5.0), TimelineOptions())
    assert timeline.collective_start_s["n"] == pytest.approx(3.0)
    assert timeline.makespan_s == pytest.approx(5.0)


def test_moe_layer_on_a_planned_network_is_aurora_equation_one() -> None:
    """Oracle (Aurora Eq. 1 with barriers): max G + N + max F + C + max A."""
    gate, expert, aggregate = np.array([1.0, 2.0]), np.array([5.0, 3.0]), np.array([0.5, 0.25])
    ops = [
        Compute("G", gate),
        flow("N", 0, 1, 1.0, ("G",), planned_s=4.0),
        Compute("F", expert, ("N",)),
        flow("C", 1, 0, 1.0, ("F",), planned_s=6.0),
        Compute("A", aggregate, ("C",)),
    ]
    timeline = run_timeline(ops, np.ones(2), TimelineOptions("planned"))
    assert timeline.makespan_s == pytest.approx(2.0 + 4.0 + 5.0 + 6.0 + 0.5)


def test_a_planned_network_runs_one_collective_at_a_time() -> None:
    """Oracle: two ready collectives of 3 s and 2 s take 5 s, not 3 s."""
    ops = [flow("x", 0, 1, 1.0, planned_s=3.0), flow("y", 2, 3, 1.0, planned_s=2.0)]
    assert run_timeline(ops, np.ones(4), TimelineOptions("planned")).makespan_s == pytest.approx(5.0)


def test_low_priority_waits_while_an_all_to_all_runs() -> None:
    """Oracle: with priority the allreduce (10 B) starts when the all-to-all (10 B, same port) ends:
    10 s + 10 s; without, both share the port and the all-to-all ends at 20 s instead of 10 s."""
    ops = [flow("a2a", 0, 1, 10.0), flow("ar", 0, 1, 10.0, low_priority=True)]
    with_priority = run_timeline(ops, np.ones(2), TimelineOptions(priority=True))
    assert with_priority.collective_finish_s["a2a"] == pytest.approx(10.0)
    assert with_priority.collective_start_s["ar"] == pytest.approx(10.0)
    without = run_timeline(ops, np.ones(2), TimelineOptions(priority=False))
    assert without.collective_finish_s["a2a"] == pytest.approx(20.0)


def test_a_started_micro_op_is_not_preempted_and_an_announced_all_to_all_blocks_new_ones() -> None:
    """Oracle: micro-op m1 (4 B) starts at 0 s; compute c runs 1-2 s and announces the all-to-all
    (4 B, same port), which starts at 2 s and shares with m1 (0.5 B/s each): m1 has 2 B left and
    ends at 6 s, the all-to-all at 8 s; m2 (after m1) may not start while the all-to-all runs: 8 s."""
    ops = [
        Compute("c0", np.array([1.0, 0.0])),
        Compute("c", np.array([1.0, 0.0]), ("c0",)),
        flow("m1", 0, 1, 4.0, low_priority=True),
        flow("a2a", 0, 1, 4.0, ("c",), announced_by=("c",)),
        flow("m2", 0, 1, 4.0, ("m1",), low_priority=True),
    ]
    timeline = run_timeline(ops, np.ones(2), TimelineOptions(priority=True))
    assert timeline.collective_start_s["m1"] == pytest.approx(0.0)
    assert timeline.collective_finish_s["m1"] == pytest.approx(6.0)
    assert timeline.collective_finish_s["a2a"] == pytest.approx(8.0)
    assert timeline.collective_start_s["m2"] == pytest.approx(8.0)


def test_an_announced_all_to_all_holds_back_micro_ops_before_it_is_ready() -> None:
    """Oracle: c (3 s) announces the all-to-all from 0 s, so the micro-op waits for it: the
    all-to-all runs 3-5 s alone, the micro-op 5-7 s."""
    ops = [
        Compute("c", np.array([3.0, 0.0])),
        flow("a2a", 0, 1, 2.0, ("c",), announced_by=("c",)),
        flow("m", 0, 1, 2.0, low_priority=True),
    ]
    timeline = run_timeline(ops, np.ones(2), TimelineOptions(priority=True))
    assert timeline.collective_finish_s["a2a"] == pytest.approx(5.0)
    assert timeline.collective_start_s["m"] == pytest.approx(5.0)


def test_an_op_graph_with_a_cycle_is_an_error() -> None:
    """Oracle: x waits for y and y for x: nothing can start."""
    ops = [Compute("x", np.ones(1), ("y",)), Compute("y", np.ones(1), ("x",))]
    with pytest.raises(ValueError, match="cannot finish"):
        run_timeline(ops, np.ones(1), TimelineOptions())


def test_an_unknown_dependency_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        run_timeline([Compute("x", np.ones(1), ("nope",))], np.ones(1), TimelineOptions())
