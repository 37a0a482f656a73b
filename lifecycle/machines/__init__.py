"""State enum, the transition table as data, and the machine that runs it."""
