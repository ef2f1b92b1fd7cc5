"""F2C's dual loader: one instance batch (B images) and one identity batch (B_id pairs) make the two batches

    x = [identity first views,  instances[: B/2]]      labels [identity labels, instance labels[: B/2]]
    y = [identity second views, instances[B/2 :]]      labels [identity labels, instance labels[B/2 :]]

exactly as the reference (§1.2). One epoch is one pass of the instance loader; the identity loader cycles.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from facescale.data.train_loader import TrainLoader, normalize_batch

Batch = tuple[torch.Tensor, torch.Tensor]


def mix_batches(
    instance: Batch,
    identity_first: torch.Tensor,
    identity_second: torch.Tensor,
    identity_labels: torch.Tensor,
) -> tuple[Batch, Batch]:
    """The two F2C batches (x, y) of one iteration from an instance batch and an identity batch."""
    images, labels = instance
    half = images.shape[0] // 2
    x = (torch.cat([identity_first, images[:half]]), torch.cat([identity_labels, labels[:half]]))
    y = (torch.cat([identity_second, images[half:]]), torch.cat([identity_labels, labels[half:]]))
    return x, y


class DualLoader:
    """Endless (x, y) batch pairs; `steps_per_epoch` and `epoch` are the instance loader's."""

    def __init__(self, instances: TrainLoader, identities, device: torch.device) -> None:
        self.instances, self.identities, self.device = instances, identities, torch.device(device)
        self.identity_batches = 0  # identity batches handed out: the identity stream's cursor

    def state_dict(self) -> dict[str, int]:
        """The instance loader's cursor plus the number of identity batches drawn so far."""
        return {**self.instances.state_dict(), "identity_batches": self.identity_batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue both streams where `state_dict` left them (call before iterating)."""
        self.instances.load_state_dict(state)
        self.identity_batches = int(state.get("identity_batches", 0))
        self.identities.dataset.start_serial = self.identity_batches

    @property
    def steps_per_epoch(self) -> int:
        return self.instances.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.instances.epoch

    @property
    def seen(self) -> int:
        """Instance samples yielded (the trainer logs data/skip_fraction from these two)."""
        return self.instances.seen

    @property
    def skipped(self) -> int:
        """Bad samples the instance loader left out (the identity index leaves the same ones out)."""
        return self.instances.skipped

    def __iter__(self) -> Iterator[tuple[Batch, Batch]]:
        pairs = iter(self.identities)
        for instance in self.instances:
            if instance[0].shape[0] % 2:
                raise ValueError(
                    f"the instance batch has {instance[0].shape[0]} images; F2C splits it into "
                    "two halves, so the per-rank batch must be even"
                )
            first, second, labels = next(pairs)
            self.identity_batches += 1
            yield mix_batches(
                instance,
                normalize_batch(first, self.device),
                normalize_batch(second, self.device),
                labels.to(self.device),
            )
