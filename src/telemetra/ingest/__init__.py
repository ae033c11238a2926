"""The one message path: decode → normalize → queue → writer (group commit)."""
