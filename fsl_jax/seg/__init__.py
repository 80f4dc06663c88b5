"""Few-shot segmenters."""
