"""Finetuning: the data sets the scripts read (dataset.py) and the trainer: options.py (flags ->
FinetuneOptions), setup.py (checks, process groups, model, DeepSpeed engine), aux_heads.py
(--aux_object_loss), loss.py, trainer.py (loop, evaluation, checkpoints); finetune.py is the
finetune_demo scripts' entry point and re-exports what they and the tests use."""
