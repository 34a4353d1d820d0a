"""Where weights come from and what is done to them: loading (local, hub, built-in, the shipped
doc_llama/), the model repository of versions, compression (`shardserve compress`) and its
validation, int8 shards; and real-shaped random checkpoints with their chat templates, which
the tests and `bench.gpu` build (so they live beside the loader, not under tests/)."""
