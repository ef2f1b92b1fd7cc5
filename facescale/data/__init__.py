"""Training data: the shard format and manifest, synthetic identities, and the DALI/webdataset readers.

Import the readers from `facescale.data.loader` (they pull in torch); this package root stays light so the
synth worker processes start fast.
"""

from facescale.data.manifest import Manifest, ManifestError, ShardInfo

__all__ = ["Manifest", "ManifestError", "ShardInfo"]
