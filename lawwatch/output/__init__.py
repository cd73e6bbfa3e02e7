"""Where snapshots go: the sink protocol and fan-out, the local history store, the trackers."""
