"""Ready-made rule rewards for RL with verifiable rewards; each is usable as `model.reward_fn`."""
