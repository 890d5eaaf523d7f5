"""Button and receiver simulators, and the storm generator."""
