"""The finetune task: adapt an encoder (a linear head, LoRA or BitFit) with DyMU, ToMe or no token
reduction during training, with Lightning (checkpoints, resume, DDP). See docs/finetune.md."""
