"""The data stage: reading, validating, de-duplicating, tokenizing and batching dialogue data."""
