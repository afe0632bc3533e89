"""Where weights come from: a run's checkpoints and base model, one reader per layout."""
