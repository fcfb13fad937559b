"""The live split of a replicated expert's rows (`split_by_load`) and its water-filling, against
bookkeeping: water-filling adds exactly its rows and levels the loads it adds to; every pair goes
to exactly one slot of its expert, as many rows in all as the static shares move."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shunter.parallel.live import split_by_load, water_fill
from shunter.parallel.moe import split_by_shares
from shunter.plan.slots import ExpertSlots


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=6), st.integers(0, 200))
def test_water_fill_adds_exactly_total_and_levels_the_loads(loads, total):
    load = np.array(loads)
    parts = water_fill(load, total)
    assert parts.sum() == total and (parts >= 0).all()
    after = load + parts
    # nothing was added to a device that ends above another device that could have taken it
    receivers = parts > 0
    if receivers.any():
        assert after[receivers].max() <= after.min() + 1


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 4).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.integers(0, 30), min_size=n * 6, max_size=n * 6),
            st.lists(
                st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True), min_size=6, max_size=6
            ),
        )
    )
)
def test_split_by_load_sends_every_pair_to_one_slot_of_its_expert(case):
    n, flat, devices_of_expert = case
    counts = np.array(flat, dtype=np.int64).reshape(n, 6)
    shares = np.zeros((6, n))
    for expert, devices in enumerate(devices_of_expert):
        shares[expert, devices] = 1.0 / len(devices)
    slots = ExpertSlots.from_shares(shares)
    parts = split_by_load(counts, slots)
    assert (parts >= 0).all()
    for expert in range(6):
        columns = np.flatnonzero(slots.slot_expert == expert)
        np.testing.assert_array_equal(parts[:, columns].sum(axis=1), counts[:, expert])
    load = np.zeros(n, dtype=np.int64)
    np.add.at(load, slots.slot_device, parts.sum(axis=0))
    static = np.zeros(n, dtype=np.int64)
    np.add.at(static, slots.slot_device, split_by_shares(counts, slots).sum(axis=0))
    assert load.sum() == static.sum() == counts.sum()
