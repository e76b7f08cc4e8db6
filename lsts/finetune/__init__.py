"""Long-context fine-tuning of Hugging Face checkpoints: LoRA, LongLoRA, SinkLoRA and full."""
