"""The three ways in. Each only hands instances to the store."""
