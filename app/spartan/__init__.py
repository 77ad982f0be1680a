"""The SPARTAN method itself: the memory layer, task memories and their file format."""
