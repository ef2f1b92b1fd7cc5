"""List an image-folder data set whose identities sit `depth` directories below the root.

Flat sets are `root/<identity>/*.jpg` (depth 1); the WebFace42M release is `root/0..9/<identity>/*.jpg`
(depth 2). The identity is the relative directory path (`3/m.0abc1`), labels follow its sorted order. As
torchvision's ImageFolder (arcface_torch's folder reader) does, an identity's images are every image below
its directory, sub-directories included, with ImageFolder's suffixes. Hidden entries (`.ipynb_checkpoints`,
macOS `._*` files) are not part of the set. Depth "auto" goes down to the first directory, in sorted order,
that holds images. Listing millions of directories shows a progress bar per level.
"""

from __future__ import annotations

import os
from pathlib import Path

from facescale.errors import InputError

# torchvision's IMG_EXTENSIONS (what arcface_torch's ImageFolder reads), any case
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_AUTO_DEPTH = 8


class FolderLayoutError(InputError, ValueError):
    """An image folder whose layout does not match the identity depth."""

    default_fix = "pass --depth N, the number of directory levels from --root down to an identity"


def is_image_name(name: str) -> bool:
    """Whether a file name has one of IMAGE_SUFFIXES (any case)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def _scan(directory: Path, skip: str = "") -> tuple[list[str], list[str]]:
    """(sorted sub-directory names, sorted image file names) of one directory; hidden entries and the
    directory named `skip` (a path, e.g. the conversion's output inside the root) are left out."""
    dirs, images = [], []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or (skip and entry.path == skip):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif is_image_name(entry.name):
                images.append(entry.name)
    return sorted(dirs), sorted(images)


def detect_depth(root: Path, skip: str = "") -> int:
    """Levels below `root` of the first directory (depth first, in sorted order) that holds images."""

    def first_images(directory: Path, depth: int) -> int | None:
        dirs, images = _scan(directory, skip)
        if images:
            return depth
        if depth == MAX_AUTO_DEPTH:
            return None
        return next((found for name in dirs if (found := first_images(directory / name, depth + 1))), None)

    found = first_images(root, 0)
    if found == 0:
        raise FolderLayoutError("images lie directly in the root; identities must be directories",
                                where=root, fix="put each identity's images in its own directory")
    if found is None:
        raise FolderLayoutError(f"holds no images within {MAX_AUTO_DEPTH} directory levels "
                                f"({', '.join(IMAGE_SUFFIXES)})", where=root)
    return found


def _images_below(directory: Path, skip: str = "") -> list[str]:
    """Every image in `directory` and its sub-directories, as sorted paths relative to it."""
    dirs, images = _scan(directory, skip)
    for name in dirs:
        images += [f"{name}/{image}" for image in _images_below(directory / name, skip)]
    return sorted(images)


def list_identities(root: Path, depth: int, progress: bool = False,
                    skip: str = "") -> list[tuple[str, list[str]]]:
    """[(identity path relative to root, sorted image paths relative to it)] for every directory `depth`
    levels down, sorted by path; images found above that depth are an error naming the directory."""
    from tqdm import tqdm

    if depth < 1:
        raise FolderLayoutError(f"--depth must be >= 1, got {depth}", where=root)
    level = [""]
    for number in range(1, depth + 1):  # scan level number-1, keep its sub-directories (level number)
        below: list[str] = []
        for rel in tqdm(level, desc=f"list level {number}/{depth}", unit="dir", disable=not progress):
            dirs, images = _scan(root / rel, skip)
            if images:
                raise FolderLayoutError(f"holds images {number - 1} level(s) below the root, above the "
                                        f"identity level {depth}", where=root / rel,
                                        fix=f"move them into an identity's directory {depth} level(s) below "
                                            "the root, or remove them")
            below += [f"{rel}/{name}" if rel else name for name in dirs]
        level = below
    identities = []
    for rel in tqdm(level, desc=f"list identities (level {depth})", unit="dir", disable=not progress):
        identities.append((rel, _images_below(root / rel, skip)))
    return sorted(identities)
