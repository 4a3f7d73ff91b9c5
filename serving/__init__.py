"""Keel serving: turns an exported model dir into vLLM arguments and runs vLLM's OpenAI server.

`python -m serving MODEL_DIR [--host H] [--port P] [--api-key K] [-- extra vLLM args]`.
"""
