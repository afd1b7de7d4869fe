"""Personalized generation: building prompts, retrieving history items and choosing what goes in."""
