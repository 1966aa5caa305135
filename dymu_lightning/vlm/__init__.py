"""The small LLaVA as a vision-language model: captions from labelled images, projector alignment,
class-name likelihood scoring, and the study of DyMU on it (docs/finetune_results.md, Study 2)."""
