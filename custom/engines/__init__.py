"""Ignite engines and handlers: resumable checkpoints (files, preemption, resume), the run lock, loss monitoring,
SSL engines."""
