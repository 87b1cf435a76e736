"""The tiny profile: real architectures with random weights, built in code (profile), and their
builders for vision models, adapters and the LLM. May import: other models/ modules and below.
"""
