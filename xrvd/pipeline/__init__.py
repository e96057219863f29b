"""The classification pipeline: select -> convert -> classify -> report. No I/O to the network,
no journal: the daemon, the back-fill and `xrvd classify` all drive these same stages."""
