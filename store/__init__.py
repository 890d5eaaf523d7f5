"""panicd's storage: one place both halves (gateway/, dispatch/) keep their state."""
