"""Scoring answers in memory: metrics and per-task scoring, shared by training, the tiny models and evaluation/."""
