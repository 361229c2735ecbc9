"""Bridges to other engines: vLLM as a generation backend, lmms-eval as a front end (optional extras)."""
