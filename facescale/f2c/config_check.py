"""F2C's config checks, run by `facescale.config.validate` through the mode registry."""

from __future__ import annotations

from facescale.config.errors import check
from facescale.config.schema import Config, HeadConfig

# `head.*` keys of the class-center layer, which F2C does not have (its pool fills from G-Net)
CENTER_KEYS = ("sample_rate", "optimizer", "update", "lr_scale", "momentum", "weight_decay", "storage_dtype",
               "init_std")


def check_f2c_config(cfg: Config, source: str, world_size: int | None) -> None:
    """F2C pool checks: sizes, EMA momentum, ZeRO-3 refusal and Q against one gathered step's labels."""
    dcp = cfg.head.f2c
    check(not cfg.head.init_from, source, "head.init_from",
          "loads Partial FC class centers; head.type f2c has none (its pool fills from G-Net); unset it")
    defaults = HeadConfig()
    unread = [f"head.{k}" for k in CENTER_KEYS if getattr(cfg.head, k) != getattr(defaults, k)]
    check(not unread, source, unread[0] if unread else "head",
          f"head.type f2c has no class centers, so it reads none of the Partial FC settings; remove "
          f"{', '.join(unread)} (F2C reads head.margin and head.f2c)")
    check(
        dcp.queue_size >= 1, source, "head.f2c.queue_size", "must be >= 1 (pool slots, e.g. 1% of identities)"
    )
    check(
        0.0 <= dcp.momentum < 1.0,
        source,
        "head.f2c.momentum",
        f"{dcp.momentum} must be in [0, 1) (G-Net EMA momentum, 0.99 in F2C)",
    )
    check(
        dcp.identities_per_rank >= 0,
        source,
        "head.f2c.identities_per_rank",
        "must be >= 0 (0 = as many identities as the per-rank micro batch)",
    )
    check(
        cfg.deepspeed.zero_stage != 3,
        source,
        "deepspeed.zero_stage",
        "head.type f2c keeps a full EMA copy of the backbone (G-Net) on every rank, which ZeRO-3's "
        "parameter partitioning cannot feed; use zero_stage 0, 1 or 2",
    )
    if world_size is None:
        return
    micro = cfg.schedule.global_batch_size // (world_size * cfg.schedule.grad_accumulation)
    check(
        micro % 2 == 0,
        source,
        "schedule.global_batch_size",
        f"head.type f2c splits each rank's instance batch into two halves, but it is {micro}; "
        "use a global batch that gives an even batch per rank",
    )
    ids = dcp.identities_per_rank or micro
    identities = _identities(cfg.data.shards)
    check(
        identities is None or identities >= world_size * ids,
        source,
        "head.f2c.identities_per_rank",
        f"{ids} identities per rank x {world_size} ranks is more than the {identities} identities in "
        f"data.shards; lower it (0 = the per-rank micro batch), or add identities",
    )
    per_pass = world_size * (ids + micro // 2)
    if dcp.pool == "replicated":
        check(
            dcp.queue_size >= per_pass,
            source,
            "head.f2c.queue_size",
            f"{dcp.queue_size} slots are fewer than the up to {per_pass} distinct labels one gathered pass "
            f"inserts ({world_size} ranks x ({ids} identities + {micro // 2} instances)); labels would "
            f"evict each other within a step. Use queue_size >= {per_pass}",
        )
    else:
        check(
            dcp.queue_size >= world_size,
            source,
            "head.f2c.queue_size",
            f"a sharded pool needs at least one slot per rank ({world_size}), got {dcp.queue_size}",
        )


def _identities(shards: str) -> int | None:
    """The identity count of data.shards' manifest.json, or None where there is none to read (yet)."""
    from facescale.data.manifest import Manifest, ManifestError

    try:
        return Manifest.load(shards).num_classes if shards else None
    except (ManifestError, OSError):
        return None
