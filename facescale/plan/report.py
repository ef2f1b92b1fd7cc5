"""Text tables of `RankPlan`s: one run in detail, or several world sizes side by side (README)."""

from __future__ import annotations

from facescale.plan.run import RankPlan

GIB = 1024**3


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:9.3f}"


def describe(plan: RankPlan, nodes: int, gpus_per_node: int) -> str:
    """The per-rank report printed by `facescale plan`."""
    lines = [
        f"world {plan.world} = {nodes} nodes x {gpus_per_node} GPUs; backbone {plan.backbone.name} "
        f"({plan.backbone.num_params / 1e6:.1f}M params), ZeRO-{plan.zero_stage}, {plan.precision}",
        f"global batch {plan.global_batch}, micro batch {plan.micro_batch} per rank; {plan.head.summary}",
        "",
        f"{'memory per rank':<34}{'GiB':>9}",
    ]
    lines += [f"  {name:<32}{_gib(value)}" for name, value in plan.memory.items()]
    lines += [
        f"  {'total':<32}{_gib(plan.total_memory)}",
        "",
    ]
    if plan.host_memory:
        lines += [f"{'host memory per rank':<34}{'GiB':>9}"]
        lines += [f"  {name:<32}{_gib(value)}" for name, value in plan.host_memory.items()]
        lines += [""]
    lines += [f"{'communication per rank per step':<34}{'GiB':>9}"]
    lines += [f"  {name:<32}{_gib(value)}" for name, value in plan.traffic.items()]
    lines += [f"  {'total':<32}{_gib(plan.total_traffic)}"]
    lines += [
        "",
        "Activations: tensors saved for backward in a meta-device forward of the real model; "
        "communication: ring-algorithm bytes sent by one rank.",
    ]
    return "\n".join(lines)


def comparison_table(plans: dict[int, RankPlan]) -> str:
    """A Markdown table with one column per node count (the README's 'Planning a large run')."""
    nodes = list(plans)
    first = plans[nodes[0]]
    rows = [
        "| per rank | "
        + " | ".join(f"{n} node{'s' if n > 1 else ''} ({plans[n].world} GPUs)" for n in nodes)
        + " |",
        "|---|" + "---:|" * len(nodes),
        "| micro batch | " + " | ".join(str(plans[n].micro_batch) for n in nodes) + " |",
    ]
    for name in first.head.table_rows:
        rows.append(f"| {name} | " + " | ".join(plans[n].head.table_rows[name] for n in nodes) + " |")
    for name in first.memory:
        values = " | ".join(f"{plans[n].memory[name] / GIB:.2f}" for n in nodes)
        rows.append(f"| {name} (GiB) | {values} |")
    totals = " | ".join(f"**{plans[n].total_memory / GIB:.2f}**" for n in nodes)
    rows.append(f"| **memory total (GiB)** | {totals} |")
    rows.append(
        "| **communication per step (GiB)** | "
        + " | ".join(f"**{plans[n].total_traffic / GIB:.2f}**" for n in nodes)
        + " |"
    )
    return "\n".join(rows)
