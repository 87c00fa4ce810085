"""The learner: group-relative advantages, the clipped-ratio objective with a KL
term to the reference policy, and AdamW on the LoRA adapter."""
