"""Fitness: the one place lm-eval is imported (evaluator.py)."""
