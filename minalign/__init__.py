"""minalign: a minimal, readable implementation of SFT, reward modelling, RLHF with PPO, and DPO."""
