"""How an all-to-all's flows share the network: one vocabulary for the planner, the simulator and
the runtime.

Transport (every module's name for the choice):
  planned         Shunter's schedule run round by round (plan.schedule.schedule_all_to_all)
  fair_share      every flow at once, ports shared max-min fairly (a plain all-to-all)
  random_order    each sender's flows one at a time in a seeded random order (Aurora's RCS)
  shortest_first  each sender's flows one at a time, smallest first (SJF)

Subsets, where only some transports apply: UnplannedTransport (what the fluid simulation runs;
formerly plan.schedule.BaselinePolicy) and SenderQueueTransport (one flow per sender at a time).
"""

from __future__ import annotations

from typing import Literal

SenderQueueTransport = Literal["random_order", "shortest_first"]
UnplannedTransport = Literal["fair_share", SenderQueueTransport]
Transport = Literal["planned", UnplannedTransport]
