"""The simulator: layer timelines on shunter.network's model.

cost (compute FLOPs and roofline or measured profiles, memory), timeline (an op graph on devices,
their streams and the network), moe_layer (Aurora's exclusive and colocated layer timelines), lina
(inference with replication, training with all-to-all priority), klotski (the offload pipeline as
a pure function of per-layer times; shared with the offload planner), predict (a `shunter plan`
output on a cluster), plots. The papers' experiments themselves (Aurora, Lina, Klotski beside their
figures) are shunter.reproduce.
"""
