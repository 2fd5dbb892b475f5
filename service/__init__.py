"""FastAPI scoring service. Imports no torch."""
