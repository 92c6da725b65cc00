"""Algorithms: each module supplies `make_batch` and `loss`; estimators are pure functions."""
