"""editrl: RL post-training (Edit-GRPO) for instruction-based video-editing diffusion models."""
