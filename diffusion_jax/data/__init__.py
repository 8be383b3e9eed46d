"""Data: sources (digits, tfds, IDX, image folders, npz) and sharded batch iterators."""
