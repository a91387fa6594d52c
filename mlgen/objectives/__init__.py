"""Objectives: ``loss(params, batch, rng) -> (loss, metrics)`` over pure pytrees."""
