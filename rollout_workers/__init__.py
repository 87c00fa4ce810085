"""Rollout workers: sample edited videos with the policy and get them scored."""
