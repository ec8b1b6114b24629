"""A training run's parts: its config and plan, the data, the model, the optimizer and its
schedule, the training loop, validation.
"""
