"""Model-family adapters; importing the package registers them all."""

from adapters import llava  # noqa: F401  (registers "llava")
