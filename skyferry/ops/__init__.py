"""After a run: read a dataset back, collect garbage, show status, profile, and make a demo."""
