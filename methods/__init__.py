"""Mitigation methods, one file each; importing the package registers them all."""

from methods import none  # noqa: F401  (registers "none")
