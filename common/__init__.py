"""Shared modules of the four task scripts: data, models, CUBS blocks, engine, loss, recall."""
