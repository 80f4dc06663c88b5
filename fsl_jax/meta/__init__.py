"""Gradient-based meta-learners."""
