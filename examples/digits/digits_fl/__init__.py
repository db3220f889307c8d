"""The digits example project (see ../README.md)."""
