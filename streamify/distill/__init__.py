"""Distillation: the one training loop, losses, LoRA wrapping, and the healing stage."""
