"""The public training sets facescale knows by name: identities and images, as arcface_torch's recipes give
them (`num_classes`, `num_image`), so a plan can be made before the data is converted."""

from __future__ import annotations

# name (the data.shards folder, any case): (identities, images)
KNOWN_SETS: dict[str, tuple[int, int]] = {
    "webface42m": (2_059_906, 42_474_557),
    "webface12m": (617_970, 12_720_066),
    "webface4m": (205_990, 4_235_242),
    "glint360k": (360_232, 17_091_657),
    "ms1mv3": (93_431, 5_179_510),
    "ms1mv2": (85_742, 5_822_653),
}


def known_set_name(num_classes: int, num_images: int) -> str | None:
    """The known set with exactly these identities and images, or None."""
    return next((name for name, size in KNOWN_SETS.items() if size == (num_classes, num_images)), None)
