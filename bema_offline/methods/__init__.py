"""Averaging methods as scalars: each output's effective weights, and TRL's replay schedule."""
