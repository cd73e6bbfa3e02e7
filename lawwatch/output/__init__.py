"""Where snapshots go: :mod:`~lawwatch.output.run` opens and closes a run's outputs (the door).

Behind it: the sink protocol and fan-out (``sinks``), the local history store (``store``), the
console line (``console``), the trackers (``trackers``) and the end of a run (``finish``).
"""
