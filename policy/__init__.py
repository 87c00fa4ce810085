"""The policy shared by rollout workers and the learner: the video-editing DiT,
its LoRA adapter, the stochastic samplers and their log-probabilities."""
