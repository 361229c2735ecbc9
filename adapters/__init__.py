"""Model-family adapters; importing the package registers every family in :data:`adapters.base.ADAPTERS`."""

from adapters import internvl, llava, qwen_vl  # noqa: F401  (registration side effects)
