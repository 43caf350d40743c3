"""Reading a committed dataset for training: planned, verified, local, resumable."""
