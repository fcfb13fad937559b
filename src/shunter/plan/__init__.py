"""Expert placement and all-to-all scheduling (Aurora) with per-layer replication (Lina).

Pure functions, arrays and specs in, frozen plan dataclasses out:
cluster (ClusterSpec from TOML), traffic (dispatch/combine matrices), schedule (rounds, bounds,
optimal and baseline schedules, the validator), matching (Hopcroft–Karp, bottleneck matching),
placement (Aurora's four cases and baselines), replication (Lina, EPLB-style), planner (whole
plans). The figures in docs/planner.md are measured by shunter.reproduce.planner_figures.
"""
