"""Data set generators: the synthetic scenes, captchas, and the synthetic set exported in released layouts."""
