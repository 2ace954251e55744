"""Tensor parallelism: the ranks' shared state and collectives (``parallel_state``), checkpoint
tensors read shard by shard (``shards``), and the worker processes rank 0 starts (``workers``)."""
