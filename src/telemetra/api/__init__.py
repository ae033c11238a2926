"""HTTP API: one router per resource, thin — parse, call a repository or service, shape the answer."""
