"""F2C mode (`head.type: f2c`): a Dynamic Class Pool of EMA-encoder features instead of a class-center matrix.

P-Net is the DeepSpeed-trained backbone, G-Net its EMA twin (`ema`), the pool a label-keyed LRU of G-Net
features with two rows per identity (`pool`), the loss a margin softmax over the pool plus a top-K push-away
for probes whose identity is not pooled (`loss`), run in two passes per iteration (`head`), fed by an
identity loader mixed with the instance loader (`identity_loader`, `dual_loader`); `mode.F2CMode` is the
registered training mode (`facescale.modes`), `plan` its share of `facescale plan`. It follows the reference
code (tiandunx/FFC) except for these deliberate deviations:

* the LRU is vectorised; writes of one gathered batch are deduplicated (per slot the last two sightings are
  kept, in gather order) and labels of the batch are never evicted by that batch; a batch with more distinct
  labels than Q is refused (the config check refuses Q below W * (B_id + B/2) for a replicated pool); a
  sharded pool's shard that gets more than its slots in one pass (a skewed label hash) keeps the most recent
  labels and counts the rest in `pool_spilled_labels`, with a warning;
* the loss is averaged over the probes of all ranks (|P| and |O| counted globally), not per rank;
* the identity loader reshuffles every pass; a one-image identity's second view is its mirror;
* G-Net is kept in fp32 and saved with the pool, label map, recency, row pointers and iteration count;
* an optional sharded pool (slot owner = hash(label) mod W, Q/W slots and its own LRU per rank, distributed
  softmax and top-K); it equals the replicated pool whenever both evict the same labels. A replicated pool
  resumes exactly on any world size; a sharded one is re-homed by label owner (`reshard`: rows, row
  pointers and LRU order carried over, the newest identities kept if a new shard overflows).
"""

from facescale.f2c.head import DcpHead

__all__ = ["DcpHead"]
