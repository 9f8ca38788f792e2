"""Adapters that describe DiT families to tfmq-video (temporal block, blocks, attention sites)."""
