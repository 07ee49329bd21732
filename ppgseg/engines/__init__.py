"""MONAI's ignite engines for few-shot work: the episode step, the few-shot evaluators and their handlers."""
