"""Persona-Plug (PPlug, arXiv 2409.11901) for decoder LLMs, at batch scale.

A frozen sentence encoder embeds every history item once; an input-aware attention pools a user's item
embeddings for the query at hand, and a trained projector turns the pooled vector into one soft token in the
LLM's input-embedding space, placed (after a trained instruction token) before the prompt. The LLM stays frozen.

Modules: :mod:`.encoder` (item and query embeddings), :mod:`.model` (aggregator and projectors),
:mod:`.training` (the training job), :mod:`.serving` (soft tokens for the pipeline's generation stage).
"""
