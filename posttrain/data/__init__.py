"""Datasets: built-in tasks and file / hub loading with column mapping."""
