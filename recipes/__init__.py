"""The recipe collection: YAML files, their schema, and the per-process training program."""
