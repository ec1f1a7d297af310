"""The launcher: environment + recipe + GPU inventory -> a plan -> the right launch."""
