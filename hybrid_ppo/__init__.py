"""hybrid_ppo: colocated PPO for LLMs on one node."""
