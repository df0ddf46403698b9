"""Finetuning: the data sets the scripts read and the training loop."""
