"""The embedded tiny target: a small Llama built deterministically and pretrained briefly on ShareGPT."""
