"""Benchmark tasks, one file each; importing the package registers them all."""

from tasks import (
    causal_pairs,  # noqa: F401  (registers "causal_pairs")
    chair,  # noqa: F401  (registers "chair")
    mme,  # noqa: F401  (registers "mme")
    pope,  # noqa: F401  (registers "pope")
    vcrbench,  # noqa: F401  (registers "vcrbench")
)
