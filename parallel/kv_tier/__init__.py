"""The cluster KV tier's data plane: chunk files in shared memory and the node store actors that own them."""
