"""The small models: random test checkpoints, and the bundled models' training and scoring."""
