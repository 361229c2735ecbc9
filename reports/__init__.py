"""Leaderboard reports and regression checks; they read result files only and never import a model."""
