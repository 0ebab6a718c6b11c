"""Local fakes that speak real protocols (no mocks of client libraries)."""
