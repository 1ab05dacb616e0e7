"""vlm-sft: functional supervised fine-tuning of vision-language models."""
