"""`facescale plan`: per-rank memory and per-step communication of a config at a given cluster size."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from facescale.commands import bounded_int


def _load(config: str, overrides: list[str]):
    """The config with its values checked, but not that its data paths exist on this machine (plans are
    made anywhere)."""
    import yaml

    from facescale.config.errors import ConfigError
    from facescale.config.load import build_config
    from facescale.config.validate import validate

    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (configs live in configs/)")
    cfg = build_config(yaml.safe_load(path.read_text()) or {}, overrides, str(path))
    validate(cfg, str(path), check_paths=False)
    return cfg


def _node_counts(value: str) -> list[int]:
    """An argparse type: --compare-nodes as a comma-separated list of node counts >= 1."""
    return [bounded_int(1)(n.strip()) for n in value.split(",")]


def _with_micro_batch(cfg, world: int, micro_batch: int | None):
    """A copy of `cfg` whose global batch gives `micro_batch` images per rank at `world` ranks."""
    import copy

    micro_batch = micro_batch or cfg.schedule.batch_per_rank
    if not micro_batch:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.schedule.global_batch_size = micro_batch * world * cfg.schedule.grad_accumulation
    return cfg


def _run(args: argparse.Namespace) -> int:
    from facescale.plan import plan_rank, resolve_num_classes
    from facescale.plan.backbone import backbone_stats
    from facescale.plan.report import comparison_table, describe

    cfg = _load(args.config, args.set or [])
    num_classes = resolve_num_classes(cfg, args.num_classes)
    precision = "bf16" if cfg.deepspeed.precision == "auto" else cfg.deepspeed.precision
    stats = backbone_stats(cfg.model, precision, cfg.data.image_size)
    if args.compare_nodes:
        plans = {
            n: plan_rank(
                _with_micro_batch(cfg, n * args.gpus_per_node, args.micro_batch),
                num_classes,
                n * args.gpus_per_node,
                stats=stats,
            )
            for n in args.compare_nodes
        }
        print(comparison_table(plans))
        return 0
    world = args.nodes * args.gpus_per_node
    plan = plan_rank(_with_micro_batch(cfg, world, args.micro_batch), num_classes, world, stats=stats)
    if args.json:
        print(
            json.dumps(
                {
                    **asdict(plan),
                    "memory": plan.memory,
                    "host_memory": plan.host_memory,
                    "total_memory": plan.total_memory,
                    "total_traffic": plan.total_traffic,
                },
                indent=2,
            )
        )
    else:
        print(f"{args.config}: {num_classes:,} identities")
        print(describe(plan, args.nodes, args.gpus_per_node))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-rank memory and communication of a run at a cluster size")
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/webface42m_r100.yaml")
    p.add_argument("--nodes", type=bounded_int(1), default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=bounded_int(1), default=8, help="ranks per node (default 8)")
    p.add_argument("--num-classes", type=bounded_int(1),
                   help="identities (default: manifest.json or a known data set)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--micro-batch", type=bounded_int(1),
                   help="images per rank; sets the global batch for each world size")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--compare-nodes", type=_node_counts, metavar="N,N,...",
                   help="a Markdown table for several node counts")
    p.set_defaults(func=_run)
