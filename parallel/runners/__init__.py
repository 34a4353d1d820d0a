"""The runners behind `parallel.runner.ModelRunner`: in the replica's process (local), in a model
process of its own, or over tp x pp rank actors (placement, rendezvous, stage loading); and how
big the KV pool each of them holds is (kv_sizing)."""
