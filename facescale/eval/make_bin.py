"""Build an insightface `.bin` verification set from aligned image folders and an LFW-style pairs file.

pairs file format (LFW `pairs.txt`), whitespace separated, one pair per line:
    optional header: `<folds> <pairs_per_fold>` or `<pairs>` (integers only; ignored)
    same person:      `<name> <n1> <n2>`           -> <root>/<name>/<name>_<n1:04d>.<ext> and ..._<n2:04d>
    different people: `<name1> <n1> <name2> <n2>`
`<ext>` is the first of jpg, jpeg, png that exists. Pair order is kept (the 10-fold protocol splits it into
contiguous folds, so keep LFW's fold-by-fold order). Images must already be aligned crops of `image_size`.
"""

from __future__ import annotations

import os

from facescale.eval.binfile import EvalSetError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


def parse_pairs(pairs_txt: str) -> list[tuple[str, int, str, int]]:
    """(name1, n1, name2, n2) per pair line of an LFW-style pairs file; bad lines raise naming file:line."""
    pairs = []
    with open(pairs_txt, encoding="utf-8") as handle:
        lines = [(number, line.split()) for number, line in enumerate(handle, start=1)]
    lines = [(number, tokens) for number, tokens in lines if tokens]
    if lines and len(lines[0][1]) <= 2 and all(t.isdigit() for t in lines[0][1]):
        lines = lines[1:]  # header
    for number, tokens in lines:
        try:
            if len(tokens) == 3:
                pairs.append((tokens[0], int(tokens[1]), tokens[0], int(tokens[2])))
            elif len(tokens) == 4:
                pairs.append((tokens[0], int(tokens[1]), tokens[2], int(tokens[3])))
            else:
                raise ValueError(f"{len(tokens)} fields")
        except ValueError as error:
            raise EvalSetError(f"expected 'name n1 n2' or 'name1 n1 name2 n2', got {' '.join(tokens)!r} "
                               f"({error})", where=f"{pairs_txt}:{number}",
                               fix="fix that line (LFW pairs.txt format)") from None
    if not pairs:
        raise EvalSetError("no pairs found", where=pairs_txt, fix="give an LFW-style pairs file")
    return pairs


def image_path(root: str, name: str, number: int) -> str:
    """Path of image `number` of `name` under `root` (LFW layout); a missing file raises naming the stem."""
    stem = os.path.join(root, name, f"{name}_{number:04d}")
    for ext in IMAGE_EXTENSIONS:
        if os.path.isfile(f"{stem}.{ext}"):
            return f"{stem}.{ext}"
    raise FileNotFoundError(f"no image {stem}.{{{','.join(IMAGE_EXTENSIONS)}}} (from the pairs file)")


_SIZE_FIX = "align the faces to crops of that size, or give --image-size the size the crops have"


def make_bin(root: str, pairs_txt: str, out: str, image_size: int | None = 112) -> int:
    """Write `out` (.bin) with the images of every pair in `pairs_txt`; return the number of pairs.

    Each image is decoded once to check it is a readable RGB crop of `image_size` (None skips the size check);
    the original encoded bytes are stored unchanged.
    """
    from facescale.eval.binfile import write_bin
    from facescale.eval.decode import decode_image

    images: list[bytes] = []
    issame: list[bool] = []
    cache: dict[str, bytes] = {}
    for name1, n1, name2, n2 in parse_pairs(pairs_txt):
        for name, number in ((name1, n1), (name2, n2)):
            path = image_path(root, name, number)
            if path not in cache:
                with open(path, "rb") as handle:
                    data = handle.read()
                decode_image(data, image_size, path, size_fix=_SIZE_FIX)
                cache[path] = data
            images.append(cache[path])
        issame.append(name1 == name2)
    write_bin(out, images, issame)
    return len(issame)
