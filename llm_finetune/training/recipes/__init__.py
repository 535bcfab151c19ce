"""One module per training method; each declares what differs from the harness (harness.Recipe)."""
