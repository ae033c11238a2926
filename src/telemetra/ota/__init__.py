"""OTA: firmware store, manifest, gateway jobs and staged rollouts (issue 8)."""
