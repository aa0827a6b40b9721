"""Capacity planning: how many devices and nodes a model needs, and how many sequences then fit."""
