"""End-to-end workflows that the command line and the tour run: data -> model -> metrics."""
