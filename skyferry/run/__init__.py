"""One run: its context, the batch's plan and commit, and the sequence each chunk walks."""
