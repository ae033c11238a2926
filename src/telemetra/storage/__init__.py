"""SQLAlchemy models, repositories and the dialect fast paths of the writer."""
