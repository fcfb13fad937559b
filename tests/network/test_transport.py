"""The transport vocabulary: the runtime's strategy names are transports under other names."""

from __future__ import annotations

from typing import get_args

from shunter.network.transport import (
    STRATEGIES,
    TRANSPORT_OF_STRATEGY,
    SenderQueueTransport,
    Strategy,
    TimelineTransport,
    Transport,
    UnplannedTransport,
)


def test_every_runtime_strategy_is_a_transport_and_the_scheduled_exchange_is_planned() -> None:
    """Oracle: parallel.exchange's docstring: all_to_all_single is fair share, the schedule is planned."""
    assert set(STRATEGIES) == set(get_args(Strategy)) == set(TRANSPORT_OF_STRATEGY)
    assert TRANSPORT_OF_STRATEGY == {
        "all_to_all": "fair_share",
        "scheduled": "planned",
        "random_order": "random_order",
    }
    assert set(TRANSPORT_OF_STRATEGY.values()) <= set(get_args(Transport))


def test_the_narrower_choices_are_subsets_of_the_transports() -> None:
    """Oracle: the four transports; unplanned ones are all but planned, sender queues RCS and SJF."""
    assert get_args(Transport) == ("planned", "fair_share", "random_order", "shortest_first")
    assert set(get_args(UnplannedTransport)) == set(get_args(Transport)) - {"planned"}
    assert set(get_args(SenderQueueTransport)) == {"random_order", "shortest_first"}
    assert set(get_args(TimelineTransport)) == {"planned", "fair_share"}
