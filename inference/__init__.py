"""Inference: the Starlette app serving a TensorFlow model and its pure-ASGI audit layer."""
