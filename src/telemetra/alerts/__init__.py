"""Server-side rules: threshold and offline alerts (issue 10)."""
