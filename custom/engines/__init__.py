"""Ignite engines and handlers: resumable checkpoints, the run lock, loss monitoring, SSL engines."""
