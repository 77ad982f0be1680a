"""Training task memories: datasets and loaders, metrics, the trainer."""
