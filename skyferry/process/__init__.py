"""Stage 2, process: decode a chunk, validate it against a schema, transform it, encode it."""
