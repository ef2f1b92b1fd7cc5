"""`facescale plan`: per-rank memory and per-step communication of a run, from the real layer definitions.

Nothing is allocated: the backbone is built on the meta device, the center optimizer's buffers too, and the
class partition is `facescale.parallel.partition.class_partition`, so a 512-rank plan runs in seconds.
"""

from facescale.plan.backbone import BackboneStats, backbone_stats, saved_tensor_bytes
from facescale.plan.run import DataSize, RankPlan, plan_rank, resolve_num_classes
from facescale.plan.zero import ZeroMemory, zero_memory

__all__ = [
    "BackboneStats",
    "DataSize",
    "RankPlan",
    "ZeroMemory",
    "backbone_stats",
    "plan_rank",
    "resolve_num_classes",
    "saved_tensor_bytes",
    "zero_memory",
]
