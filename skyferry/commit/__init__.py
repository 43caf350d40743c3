"""Stage 4, store: journal each stored chunk, and commit the batch with its manifest."""
