"""List an image-folder data set whose identities sit `depth` directories below the root.

Flat sets are `root/<identity>/*.jpg` (depth 1); the WebFace42M release is `root/0..9/<identity>/*.jpg`
(depth 2). The identity is the relative directory path (`3/m.0abc1`), labels follow its sorted order.
Depth "auto" follows the first directory at each level down to the first one that holds images. Listing
millions of directories shows a progress bar per level.
"""

from __future__ import annotations

import os
from pathlib import Path

from facescale.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_AUTO_DEPTH = 8


class FolderLayoutError(InputError, ValueError):
    """An image folder whose layout does not match the identity depth."""

    default_fix = "pass --depth N, the number of directory levels from --root down to an identity"


def is_image_name(name: str) -> bool:
    """Whether a file name has one of IMAGE_SUFFIXES (any case)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def _scan(directory: Path) -> tuple[list[str], list[str]]:
    """(sorted sub-directory names, sorted image file names) of one directory."""
    dirs, images = [], []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir():
                dirs.append(entry.name)
            elif is_image_name(entry.name):
                images.append(entry.name)
    return sorted(dirs), sorted(images)


def detect_depth(root: Path) -> int:
    """Levels below `root` of the first directory (in sorted order) that holds images."""
    current = root
    for depth in range(MAX_AUTO_DEPTH + 1):
        dirs, images = _scan(current)
        if images:
            if depth == 0:
                raise FolderLayoutError("images lie directly in the root; identities must be directories",
                                        where=root, fix="put each identity's images in its own directory")
            return depth
        if not dirs:
            break
        current = current / dirs[0]
    raise FolderLayoutError(f"holds no images within {MAX_AUTO_DEPTH} directory levels "
                            f"({', '.join(IMAGE_SUFFIXES)})", where=root)


def list_identities(root: Path, depth: int, progress: bool = False) -> list[tuple[str, list[str]]]:
    """[(identity path relative to root, sorted image names)] for every directory `depth` levels down,
    sorted by path; images found above that depth are an error naming the directory."""
    from tqdm import tqdm

    if depth < 1:
        raise FolderLayoutError(f"--depth must be >= 1, got {depth}", where=root)
    level = [""]
    for number in range(1, depth + 1):  # scan level number-1, keep its sub-directories (level number)
        below: list[str] = []
        for rel in tqdm(level, desc=f"list level {number}/{depth}", unit="dir", disable=not progress):
            dirs, images = _scan(root / rel)
            if images:
                raise FolderLayoutError(f"holds images {number - 1} level(s) below the root, above the "
                                        f"identity level {depth}", where=root / rel,
                                        fix=f"pass --depth {max(1, number - 1)} or move the images")
            below += [f"{rel}/{name}" if rel else name for name in dirs]
        level = below
    identities = []
    for rel in tqdm(level, desc=f"list identities (level {depth})", unit="dir", disable=not progress):
        _, images = _scan(root / rel)
        identities.append((rel, images))
    return sorted(identities)
