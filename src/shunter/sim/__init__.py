"""The simulator: layer timelines on shunter.network's model, and the papers' experiments on them.

cost (compute FLOPs and roofline or measured profiles, memory), timeline (an op graph on devices,
their streams and the network), moe_layer (Aurora's exclusive and colocated layer timelines), lina
(inference with replication, training with all-to-all priority), klotski (the offload pipeline as
a pure function of per-layer times; shared with the offload planner), predict (a `shunter plan`
output on a cluster), reproduce (Aurora, Lina, Klotski beside their papers), plots.
"""
