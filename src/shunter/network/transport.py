"""How an all-to-all's flows share the network: one vocabulary for the planner, the simulator and
the runtime.

Transport (every module's name for the choice):
  planned         Shunter's schedule run round by round (plan.schedule.schedule_all_to_all)
  fair_share      every flow at once, ports shared max-min fairly (a plain all-to-all)
  random_order    each sender's flows one at a time in a seeded random order (Aurora's RCS)
  shortest_first  each sender's flows one at a time, smallest first (SJF)

Subsets, where only some transports apply: UnplannedTransport (what the fluid simulation runs;
formerly plan.schedule.BaselinePolicy), SenderQueueTransport (one flow per sender at a time) and
TimelineTransport (what a timeline of concurrent collectives models; formerly sim.timeline's
NetworkMode and sim.predict's NetworkChoice).

Strategy keeps the runtime's own names for three transports (parallel.exchange), because
`shunter bench a2a` writes them as JSON keys: "scheduled" is planned, "all_to_all" (one
all_to_all_single) is fair_share, "random_order" is random_order (TRANSPORT_OF_STRATEGY).
"""

from __future__ import annotations

from typing import Literal

SenderQueueTransport = Literal["random_order", "shortest_first"]
UnplannedTransport = Literal["fair_share", SenderQueueTransport]
Transport = Literal["planned", UnplannedTransport]
TimelineTransport = Literal["planned", "fair_share"]

Strategy = Literal["all_to_all", "scheduled", "random_order"]
STRATEGIES: tuple[Strategy, ...] = ("all_to_all", "scheduled", "random_order")
TRANSPORT_OF_STRATEGY: dict[Strategy, Transport] = {
    "all_to_all": "fair_share",
    "scheduled": "planned",
    "random_order": "random_order",
}
