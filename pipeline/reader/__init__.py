"""The training side: checked stores, batched reads, shuffled batches, normalize on read."""
