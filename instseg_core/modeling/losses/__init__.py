"""Training losses, assigners and matchers of the model families."""
