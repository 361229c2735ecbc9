"""Mitigation methods, one file each; importing the package registers them all."""

from methods import cca, embedlens, fastervlm, fastv, mma, none, var  # noqa: F401  (registers them)
