"""lora-ds: LoRA fine-tuning of large language models on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
