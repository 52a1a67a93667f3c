"""Small helpers every layer uses: one way to run a subprocess, one retry with a deadline, hashing."""
