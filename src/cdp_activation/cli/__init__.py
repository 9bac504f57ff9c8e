"""The command line: `cdp-activation` and the runner that executes activation jobs for it."""
