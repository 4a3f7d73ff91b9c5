"""Keel data: the conversation format contract and data preparation.

`data.formats` holds each conversation format once (chat template + spec); the trainer renders
training rows with it and the server hands the same files to vLLM.
"""
