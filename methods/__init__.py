"""Mitigation methods, one file each; importing the package registers them all."""

from methods import carve, cca, embedlens, fastervlm, fastv, iri, mma, none, var  # noqa: F401  (registers them)
