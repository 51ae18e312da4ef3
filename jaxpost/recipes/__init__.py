"""Recipes: whole training jobs (data, model, step, host loop) that experiments configure and call."""
