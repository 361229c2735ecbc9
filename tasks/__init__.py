"""Benchmark tasks, one file each; importing the package registers them all."""

from tasks import pope  # noqa: F401  (registers "pope")
