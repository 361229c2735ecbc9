"""Core of the LVLM hallucination harness: registries, the evaluation engine, results and statistics.

The core knows the *interfaces* of tasks, adapters and methods, never a concrete model family or paper.
"""

__version__ = "0.1.0"
