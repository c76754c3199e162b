"""Chat with an exported checkpoint: `generate` makes the replies, `session` talks with the user."""
