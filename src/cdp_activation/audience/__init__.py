"""The audience: the warehouse connection and the contract of audience SQL."""
