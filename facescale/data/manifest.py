"""`manifest.json`: the description of a shard directory (counts, classes, shard checksums) and its checks."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from facescale.errors import InputError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "facescale-wds-1"
_FIX = "regenerate the directory with `facescale synth --out DIR` or a facescale converter"


class ManifestError(InputError, ValueError):
    """A shard directory's manifest is missing or does not match its shards; the message says the fix."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: file name relative to the manifest, sample count, sha256 of the tar bytes."""

    name: str
    num_samples: int
    sha256: str

    @property
    def index_name(self) -> str:
        """The DALI index file that sits next to the tar (`train-000000.tar` -> `train-000000.idx`)."""
        return self.name[: -len(".tar")] + ".idx" if self.name.endswith(".tar") else self.name + ".idx"


@dataclass
class Manifest:
    """What a shard directory holds; `load`/`save` read and write `manifest.json` in that directory."""

    num_classes: int
    num_samples: int
    image_size: int
    source: str
    shards: list[ShardInfo]
    samples_per_identity: list[int]
    directory: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, `format` first; `directory` is where it was read from and is not stored."""
        body = asdict(self)
        body.pop("directory")
        return {"format": MANIFEST_FORMAT, **body}

    def save(self, directory: str | Path) -> Path:
        """Write `manifest.json` into `directory` (atomically, via a temporary file) and return its path."""
        self.validate(Path(directory) / MANIFEST_NAME)
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        self.directory = Path(directory)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read and check `directory/manifest.json`; raises ManifestError naming the file and the fix."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path} not found: data.shards must name a directory holding "
                                f"manifest.json and its train-*.tar shards; {_FIX}")
        try:
            body = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ManifestError(f"{path} is not valid JSON ({error}); {_FIX}") from error
        manifest = cls.from_dict(body, path)
        manifest.directory = Path(directory)
        return manifest

    @classmethod
    def from_dict(cls, body: Any, path: str | Path = MANIFEST_NAME) -> Manifest:
        """Build from a parsed JSON document, checking the format tag, every key's type and the counts."""
        if not isinstance(body, dict):
            raise ManifestError(f"{path}: expected a JSON object at the top level; {_FIX}")
        if body.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{path}: format is {body.get('format')!r}, expected {MANIFEST_FORMAT!r}; "
                                f"{_FIX}")
        expected = {"num_classes": int, "num_samples": int, "image_size": int, "source": str, "shards": list,
                    "samples_per_identity": list}
        for key, kind in expected.items():
            if key not in body:
                raise ManifestError(f"{path}: missing key {key!r}; {_FIX}")
            if not isinstance(body[key], kind) or isinstance(body[key], bool):
                raise ManifestError(f"{path}: key {key!r} must be a {kind.__name__}, "
                                    f"got {body[key]!r:.60}; {_FIX}")
        shards = []
        for number, entry in enumerate(body["shards"]):
            try:
                shards.append(ShardInfo(name=str(entry["name"]), num_samples=int(entry["num_samples"]),
                                        sha256=str(entry["sha256"])))
            except (KeyError, TypeError, ValueError) as error:
                raise ManifestError(f"{path}: shards[{number}] needs name, num_samples and sha256 "
                                    f"({error!r}); {_FIX}") from error
        manifest = cls(num_classes=body["num_classes"], num_samples=body["num_samples"],
                       image_size=body["image_size"], source=body["source"], shards=shards,
                       samples_per_identity=[int(n) for n in body["samples_per_identity"]])
        manifest.validate(path)
        return manifest

    def validate(self, path: str | Path = MANIFEST_NAME) -> None:
        """Check that the counts agree with each other; raises ManifestError otherwise."""
        if not self.shards:
            raise ManifestError(f"{path}: lists no shards; {_FIX}")
        if sum(s.num_samples for s in self.shards) != self.num_samples:
            total = sum(s.num_samples for s in self.shards)
            raise ManifestError(f"{path}: shard sample counts sum to {total} "
                                f"but num_samples is {self.num_samples}; {_FIX}")
        if self.samples_per_identity and (len(self.samples_per_identity) != self.num_classes
                                          or sum(self.samples_per_identity) != self.num_samples):
            raise ManifestError(f"{path}: samples_per_identity has {len(self.samples_per_identity)} entries "
                                f"summing to {sum(self.samples_per_identity)}, expected {self.num_classes} "
                                f"entries summing to num_samples={self.num_samples}; {_FIX}")
        if self.num_classes < 1 or self.image_size < 1:
            raise ManifestError(f"{path}: num_classes and image_size must be positive; {_FIX}")

    def shard_paths(self) -> list[Path]:
        """Absolute paths of the tars, in manifest order (needs a manifest read by `load`)."""
        return [self._root() / s.name for s in self.shards]

    def index_paths(self) -> list[Path]:
        """Absolute paths of the DALI `.idx` files matching `shard_paths()`."""
        return [self._root() / s.index_name for s in self.shards]

    def _root(self) -> Path:
        if self.directory is None:
            raise ManifestError("this Manifest was not read from a directory; use Manifest.load(dir)")
        return self.directory.resolve()
