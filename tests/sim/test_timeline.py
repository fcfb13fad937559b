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


# Shared cores: the devices are processes on `cores` cores, processor-shared (TimelineOptions.cores).


def test_four_devices_on_two_cores_each_run_at_half_speed() -> None:
    """Oracle: 4 devices with 1 s of work each, ready at 0 on 2 cores, each at 1/2: all end at 2 s,
    each busy 2 s of wall time."""
    timeline = run_timeline([Compute("f", np.ones(4))], np.ones(4), TimelineOptions(cores=2))
    np.testing.assert_allclose(timeline.compute_finish_s["f"], [2.0, 2.0, 2.0, 2.0])
    np.testing.assert_allclose(timeline.busy_s, [2.0, 2.0, 2.0, 2.0])


def test_a_device_computing_alone_runs_at_full_speed() -> None:
    """Oracle: one device of four has work (1 s) on 2 cores: it ends at 1 s."""
    timeline = run_timeline(
        [Compute("f", np.array([0.0, 1.0, 0.0, 0.0]))], np.ones(4), TimelineOptions(cores=2)
    )
    np.testing.assert_allclose(timeline.compute_finish_s["f"], [0.0, 1.0, 0.0, 0.0])


def test_devices_sharing_cores_split_them_until_the_shortest_finish() -> None:
    """Oracle: 4 devices on 2 cores at 1/2 until 1 s of work is done (t = 2), then 3 share 2 cores
    (2/3 speed) for the next 1 s of work (t = 3.5), then 2 on 2 cores at full speed; a device
    without work (0 s) occupies nothing."""
    work = np.array([1.0, 2.0, 4.0, 0.0, 3.0])
    timeline = run_timeline([Compute("f", work)], np.ones(5), TimelineOptions(cores=2))
    np.testing.assert_allclose(timeline.compute_finish_s["f"], [2.0, 3.5, 5.5, 0.0, 4.5])


def test_a_staggered_start_shares_only_while_both_compute() -> None:
    """Oracle, one core: device 0 computes 2 s from 0; device 1 first copies for 1 s (a copy stream
    is not the CPU's: device 0 runs alone, 1 s of work done), then computes 0.5 s: both at 1/2,
    device 1 ends at 2 s; device 0's last 0.5 s alone: 2.5 s."""
    ops = [
        Compute("copy", np.array([0.0, 1.0]), stream="copy"),
        Compute("f", np.array([2.0, 0.5]), ("copy",)),
    ]
    timeline = run_timeline(ops, np.ones(2), TimelineOptions(cores=1))
    np.testing.assert_allclose(timeline.compute_start_s["f"], [0.0, 1.0])
    np.testing.assert_allclose(timeline.compute_finish_s["f"], [2.5, 2.0])


def test_on_shared_cores_a_device_starts_its_next_op_when_its_own_inputs_are_done() -> None:
    """Oracle, one core: a = [2, 1] s, b = [1, 1] s after a. Both run a at 1/2; device 1's ends at
    2 s and it starts b (its own a is done) beside device 0's a, both at 1/2: a ends on device 0
    at 4 s, b on device 1 at 4 s; device 0's b alone: 5 s."""
    ops = [Compute("a", np.array([2.0, 1.0])), Compute("b", np.array([1.0, 1.0]), ("a",))]
    timeline = run_timeline(ops, np.ones(2), TimelineOptions(cores=1))
    np.testing.assert_allclose(timeline.compute_finish_s["a"], [4.0, 2.0])
    np.testing.assert_allclose(timeline.compute_start_s["b"], [4.0, 2.0])
    np.testing.assert_allclose(timeline.compute_finish_s["b"], [5.0, 4.0])


def test_a_device_computing_while_the_others_wait_in_a_collective_runs_at_full_speed() -> None:
    """Oracle, 1 core: g = [1, 1] shared (2 s), then the all-to-all (2 B at 1 B/s, 2-4 s), then
    f = [3, 1]: both at 1/2 until device 1's 1 s is done (6 s), device 0's last 2 s alone (8 s)."""
    ops = [
        Compute("g", np.array([1.0, 1.0])),
        flow("n", 0, 1, 2.0, ("g",)),
        Compute("f", np.array([3.0, 1.0]), ("n",)),
    ]
    timeline = run_timeline(ops, np.ones(2), TimelineOptions(cores=1))
    assert timeline.collective_start_s["n"] == pytest.approx(2.0)
    np.testing.assert_allclose(timeline.compute_finish_s["f"], [8.0, 6.0])
    assert timeline.makespan_s == pytest.approx(8.0)


@pytest.mark.parametrize("priority", [False, True])
def test_as_many_cores_as_devices_is_compute_of_their_own(priority: bool) -> None:
    """Oracle: the eager engine (cores=None) on the same graph: with a core each nothing is shared."""
    ops = [
        Compute("g", np.array([1.0, 3.0, 2.0])),
        Compute("w", np.array([0.5, 0.0, 2.5]), ("g",), stream="copy"),
        flow("m1", 0, 2, 4.0, low_priority=True),
        flow("n", 0, 1, 5.0, ("g",), announced_by=("g",)),
        Compute("f", np.array([2.0, 1.0, 0.0]), ("n", "w")),
        flow("c", 1, 2, 3.0, ("f",)),
        flow("m2", 0, 2, 4.0, ("m1", "f"), low_priority=True),
        Compute("a", np.array([1.0, 1.0, 1.0]), ("c",)),
    ]
    eager = run_timeline(ops, np.full(3, 2.0), TimelineOptions(priority=priority))
    for cores in (3, 8):
        shared = run_timeline(ops, np.full(3, 2.0), TimelineOptions(priority=priority, cores=cores))
        assert shared.makespan_s == pytest.approx(eager.makespan_s)
        np.testing.assert_allclose(shared.busy_s, eager.busy_s)
        for name in eager.compute_finish_s:
            np.testing.assert_allclose(shared.compute_start_s[name], eager.compute_start_s[name])
            np.testing.assert_allclose(shared.compute_finish_s[name], eager.compute_finish_s[name])
        for name in eager.collective_finish_s:
            assert shared.collective_start_s[name] == pytest.approx(eager.collective_start_s[name])
            assert shared.collective_finish_s[name] == pytest.approx(eager.collective_finish_s[name])


def test_a_cycle_on_shared_cores_is_an_error() -> None:
    ops = [Compute("x", np.ones(2), ("y",)), Compute("y", np.ones(2), ("x",))]
    with pytest.raises(ValueError, match="cannot finish"):
        run_timeline(ops, np.ones(2), TimelineOptions(cores=1))


@pytest.mark.parametrize("cores", [None, 3])
def test_a_device_is_past_a_collective_once_its_own_flows_end(cores: float | None) -> None:
    """Oracle, by hand on ports of 1 byte/s: all-to-all x moves 2 bytes 0 -> 1 and 6 bytes 1 -> 2.
    Device 0's part ends at 2 s, device 1's and 2's at 6 s; a device with no flow in collective y
    (device 0) is past it as y starts. The compute after x starts on each device when its own part
    ends (a rank's all-to-all returns then), not when the last byte anywhere arrives."""
    x = Collective("x", np.array([0, 1]), np.array([1, 2]), np.array([2.0, 6.0]))
    ops = [
        x,
        Compute("f", np.array([1.0, 1.0, 1.0]), ("x",)),
        flow("y", 1, 2, 1.0, ("f",)),
        Compute("g", np.array([1.0, 1.0, 1.0]), ("y",)),
    ]
    timeline = run_timeline(ops, np.ones(3), TimelineOptions(cores=cores))
    assert timeline.collective_finish_s["x"] == pytest.approx(6.0)
    assert timeline.compute_start_s["f"] == pytest.approx([2.0, 6.0, 6.0])
    assert timeline.collective_start_s["y"] == pytest.approx(7.0)
    assert timeline.compute_start_s["g"] == pytest.approx([7.0, 8.0, 8.0])
