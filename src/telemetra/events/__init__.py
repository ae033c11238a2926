"""Committed changes as typed events, and the in-process hub that fans them out (see ``model`` and ``hub``)."""
