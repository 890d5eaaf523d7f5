"""panicd dispatch side: routing, escalation, channels and webhooks."""
