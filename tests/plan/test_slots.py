"""Expert slots: a placement as the expert-parallel runtime consumes it."""

from __future__ import annotations

import numpy as np
import pytest

from shunter.plan.replication import eplb_replicate
from shunter.plan.slots import ExpertSlots


def test_slots_are_eplbs_physical_and_logical_maps():
    """Oracle: EPLB's maps by hand for a small replicated placement."""
    placement = eplb_replicate(np.array([90.0, 10.0, 10.0, 10.0]), num_devices=2, slots_per_device=3)
    slots = ExpertSlots.from_shares(placement.shares)
    assert slots.replica_count.sum() == slots.num_slots
    table = slots.expert_slots()
    for expert in range(4):
        listed = table[expert][table[expert] >= 0]
        assert len(listed) == slots.replica_count[expert]
        assert np.all(slots.slot_expert[listed] == expert)
        assert slots.slot_share[listed].sum() == pytest.approx(1.0)
    assert slots.replica_count[0] >= 2  # the hot expert is replicated


def test_an_exclusive_placement_has_one_slot_per_expert():
    slots = ExpertSlots.from_device_of_expert(np.array([2, 0, 1, 2]), 3)
    assert slots.is_exclusive and slots.num_slots == 4
    np.testing.assert_array_equal(slots.device_of_expert(), [2, 0, 1, 2])
    np.testing.assert_array_equal(slots.shares().argmax(axis=1), [2, 0, 1, 2])
