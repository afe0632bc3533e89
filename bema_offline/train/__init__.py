"""Training around the averages: DPO rounds, preference data, and the demo run."""
