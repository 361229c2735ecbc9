"""Mitigation methods, one file each; importing the package registers them all."""

from methods import carve, cca, embedlens, fastervlm, fastv, iri, mma, none, ritual, var, vcd, vhr  # noqa: F401
