"""Shared pieces of the NAS tests: a few fixed genotypes."""

from __future__ import annotations

from fisher_fast.nas import Genotype

EVERY_OP_4 = Genotype.from_string(
    "|conv_3x3~0|+|dil_conv_3x3~0|conv_7x1_1x7~1|+|max_pool_3x3~0|avg_pool_3x3~1|conv_5x5~2|"
)
"""A 4-node cell whose six live edges use six different operations."""

IDENTITY_3 = Genotype(3, ("identity", "identity", "identity"))
"""A 3-node cell of identities: parameters only where a reduction needs a projection."""
