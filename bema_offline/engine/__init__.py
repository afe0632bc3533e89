"""From a plan to output bytes: the plan, the streaming engine, and its C kernel."""
