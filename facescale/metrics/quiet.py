"""Filters for library warnings a user of facescale cannot act on (each one says why it is safe to drop)."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


_DEEPSPEED_FILTER = _DropMessages("untested optimizer")


def silence_unactionable_warnings() -> None:
    """Idempotent; call before `deepspeed.initialize` so its sanity check is filtered too."""
    # DeepSpeed warns "You are using ZeRO with an untested optimizer" for any client optimizer outside its
    # own list, which leaves out torch.optim.SGD, the arcface recipe's optimizer. ZeRO only partitions the
    # state of the optimizer, which is sound for any optimizer whose step is elementwise per parameter (SGD,
    # AdamW: facescale/train/trainer.py builds nothing else), and tests/test_train_equivalence.py checks
    # ZeRO 0-3 with it give the same step on 1 and 2 ranks; nothing is left for the user to do.
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if _DEEPSPEED_FILTER not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_DEEPSPEED_FILTER)
    # torch >= 2.10 deprecates all_gather_into_tensor; DeepSpeed's ZeRO still calls it to re-gather the
    # updated parameter partitions (deepspeed/comm/torch.py). facescale's own collectives already use
    # all_gather_single (facescale/parallel/collectives.py); the caller left is DeepSpeed's, out of reach.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
