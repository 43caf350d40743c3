"""Stage 3, distribute: probe the nodes, place each chunk's replicas, write and verify them."""
