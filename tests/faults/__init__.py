"""Fault tests: real panicd and real Mosquitto, killed with SIGKILL mid-storm (issue 12 item 5)."""
