"""Stage 1, ingest: list the source, find what is new, cut record-aligned chunks, read them."""
