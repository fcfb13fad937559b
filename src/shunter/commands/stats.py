"""`shunter stats [TRACE]`: how skewed and how correlated a model's routing is.

Per MoE layer: max/min and max/mean expert load, and how often a token that chose expert e picks
one of e's top-k successors at the next layer, beside a shuffled control that keeps each layer's
popularity but breaks the link between layers (what chance alone gives).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from shunter.commands.common import print_json
from shunter.model.loader import default_trace_path
from shunter.trace import expert_load, load_trace, successor_hit_rate, transition_mutual_information
from shunter.units import check_fits_in_memory, flag_type, parse_seed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stats",
        help="skew and layer-to-layer correlation of a routing trace",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "trace", metavar="TRACE", nargs="?", type=Path, help="trace file (default: the built-in model's)"
    )
    p.add_argument("--seed", type=flag_type(parse_seed), default=0, help="seed of the shuffled control")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = args.trace or default_trace_path()
    trace = load_trace(path)
    # transition counts and their shuffled control, [L-1, E, E] each, and the temporaries beside them
    pairs = max(trace.num_layers - 1, 0) * trace.num_experts**2
    check_fits_in_memory(4 * 8 * pairs, "the layer-to-layer statistics", str(path))
    load = expert_load(trace).astype(np.float64)
    hit = successor_hit_rate(trace)
    control = successor_hit_rate(trace, shuffle_seed=args.seed)
    information = transition_mutual_information(trace)
    information_control = transition_mutual_information(trace, shuffle_seed=args.seed)
    rows = []
    for m in range(trace.num_layers):
        rows.append(
            {
                "layer": int(trace.layer_indices[m]),
                "max_over_min_load": float(load[m].max() / load[m].min()) if load[m].min() > 0 else None,
                "max_over_mean_load": float(load[m].max() / load[m].mean()),
                "successor_hit_rate": float(hit[m]) if m < len(hit) else None,
                "shuffled_hit_rate": float(control[m]) if m < len(control) else None,
                "mutual_information_bits": float(information[m]) if m < len(information) else None,
                "shuffled_mutual_information_bits": float(information_control[m])
                if m < len(information)
                else None,
            }
        )
    summary = {
        "trace": str(path),
        "tokens": trace.num_tokens,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "layers": rows,
    }
    if args.json:
        print_json(summary)
        return 0
    print(f"{path}: {trace.num_tokens} tokens, {trace.num_experts} experts, top-{trace.top_k}")
    print("layer  max/min load  max/mean load  successor hit (shuffled)  mutual information bits (shuffled)")
    for r in rows:
        ratio = f"{r['max_over_min_load']:.2f}" if r["max_over_min_load"] is not None else "inf"
        if r["successor_hit_rate"] is None:
            pairs = f"{'-':>24}  {'-':>34}"
        else:
            pairs = (
                f"{r['successor_hit_rate']:>13.3f} ({r['shuffled_hit_rate']:.3f})  "
                f"{r['mutual_information_bits']:>23.3f} ({r['shuffled_mutual_information_bits']:.3f})"
            )
        print(f"{r['layer']:5d}  {ratio:>12}  {r['max_over_mean_load']:13.2f}  {pairs}")
    return 0
