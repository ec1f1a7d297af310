"""The recipe collection (*.yaml, bundled data in datasets/) and what both the launcher and the
training program read about it: the schema, the catalog, the data formats, the methods and the
modes. Pure: pydantic and PyYAML only, never torch."""
