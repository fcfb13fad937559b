"""Expert placement and all-to-all scheduling (Aurora) with per-layer replication (Lina).

Pure functions, arrays and specs in, frozen plan dataclasses out:
cluster (ClusterSpec from TOML), traffic (dispatch/combine matrices), schedule (optimal and lane
schedules, the validator; bounds and baselines are shunter.network's), matching (Hopcroft–Karp,
bottleneck matching), placement (Aurora's four cases and baselines), replication (Lina,
EPLB-style), planner (whole plans), slots (a placement as the runtime consumes it), document (the
plan document every consumer reads). The figures in docs/planner.md are measured by
shunter.reproduce.planner_figures.
"""
