"""The model registry: validates uploaded model zips and keeps each version immutable in the model store."""
