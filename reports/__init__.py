"""Leaderboard reports: they read result and record files only, never load torch, a model or the engine.

The regression check, which reruns the engine, is :mod:`checks.regress`.
"""
