"""The per-process training program (`python -m trainer`): the only package that imports the torch
stack. trainer/program.py reads top to bottom in phases; see its docstring."""
