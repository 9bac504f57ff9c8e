"""One module per emulated provider: its routes, request checks and answers."""
